"""Tiny offline assets for the inference / merge / chat tests: a byte-level tokenizer with Llama 3
style special tokens and chat template, random tiny Llama models, model dirs and run dirs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llamaft.model.inference import TokenRules

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """256 byte tokens (no merges) + the specials at ids 256..261 (..260 without the pad token)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[2:] if pad else SPECIALS[2:-1]})
    if pad:
        fast.pad_token = "<|finetune_right_pad_id|>"
    fast.chat_template = TEMPLATE
    return fast


def tiny_rules(tok) -> TokenRules:
    ids = tok.convert_tokens_to_ids
    return TokenRules(
        family="llama3", instruct=True, pad_id=ids("<|finetune_right_pad_id|>"), eos_id=ids("<|end_of_text|>"),
        stop_ids=[ids("<|end_of_text|>"), ids("<|eot_id|>")], turn_end_ids=[ids("<|eot_id|>")],
        chat_template=TEMPLATE, template_kwargs={},
    )


def tiny_model(vocab_size: int = 262, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=256, eos_token_id=257, pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Default init (std 0.02) gives near-uniform logits: greedy would sit on near-ties. A larger
    # scale makes argmax decisive, so exact-equality tests test padding, not float noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def save_model_dir(model, tok, rules, out: Path) -> Path:
    model.generation_config.eos_token_id = list(rules.stop_ids)
    model.generation_config.pad_token_id = rules.pad_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_run_dir(root: Path, *, method: str = "lora", seed: int = 0, add_pad: bool = False,
                 tok=None, base=None, model_extra: dict | None = None) -> Path:
    """A run dir as training leaves it, built with llamaft's own tokenizer/load/adapter/save functions.
    LoRA B (and the rows of added tokens) get non-zero random values: a fresh adapter is a no-op,
    which would make merge tests pass vacuously. add_pad: the tokenizer has no spare special token,
    so training adds <|pad|> and resizes the embeddings (saved with the adapter)."""
    import yaml

    from llamaft.config import config_from_dict, save_config
    from llamaft.model.adapters import apply_adapters, save_trained
    from llamaft.model.load import load_base
    from llamaft.model.tokenizer import load_tokenizer, save_tokenizer

    if tok is None:
        tok = tiny_tokenizer(pad=not add_pad)
        base = tiny_model(vocab_size=len(tok), seed=seed)
        if not add_pad:
            base.generation_config.eos_token_id = list(tiny_rules(tok).stop_ids)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    run = root / "run"
    (root / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    cfg = config_from_dict({
        "model": {"name": str(base_dir), "method": method, "dtype": "float32", "add_pad_token": add_pad, **(model_extra or {})},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": [str(root / "train.jsonl")]},
        "train": {"output_dir": str(run)},
    })
    tok, rules = load_tokenizer(cfg.model, cfg.data)
    model = load_base(cfg.model.model_copy(update={"method": "lora"}), cfg.quantization, rules, tok, torch.float32)
    if method != "full":
        model = apply_adapters(model, cfg.model.model_copy(update={"method": "lora"}), cfg.lora)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if method == "full":
                p.add_(torch.randn_like(p) * 0.1)
            elif "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.2)
    sub = run / ("model" if method == "full" else "adapter")
    save_trained(model, sub)
    save_tokenizer(tok, rules, sub)
    save_config(cfg, run / "config.yaml")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["method"] == method
    return run
