"""Tiny random Llama + WordLevel tokenizer + hand-built Examples for CPU training tests (seconds)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from llamaft.config import config_from_dict

VOCAB = 64


@dataclass
class Rules:  # same fields as llamaft.model.tokenizer.TokenRules (the parts training reads)
    pad_id: int = 0
    eos_id: int = 1
    stop_ids: list = field(default_factory=lambda: [1, 3])
    turn_end_ids: list = field(default_factory=lambda: [3])
    family: str = "other"
    instruct: bool = False
    chat_template: str | None = None
    template_kwargs: dict = field(default_factory=dict)
    added_tokens: list = field(default_factory=list)  # tokens the tokenizer layer added (e.g. <|pad|>)


@dataclass
class Ex:
    input_ids: list
    labels: list
    where: str = "test"


@dataclass
class Data:
    train: list
    validation: dict
    test: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"rows": 0})


def tokenizer(extra_pad: bool = False):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<eot>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    if extra_pad:  # like model.add_pad_token: a new id past the embedding matrix
        t.add_special_tokens({"pad_token": "<|pad|>"})
    t.padding_side = "right"
    return t


def tiny_model_dir(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    out = root / "tiny-llama"
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def examples(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, VOCAB) for _ in range(rng.randint(4, 11))] + [1]
        out.append(Ex(ids, [-100, -100] + ids[2:]))
    return out


def dataset() -> Data:
    return Data(train=examples(32, 1), validation={"alpha": examples(8, 2), "b_set": examples(6, 3)})


def run_config(model_dir: Path, out_dir: Path, **train) -> object:
    raw = {
        "model": {"name": str(model_dir), "method": train.pop("method", "lora")},
        "lora": {"r": 4, "alpha": 8, "dropout": train.pop("dropout", 0.0)},
        "data": {"train": ["unused.jsonl"]},
        "train": {"output_dir": str(out_dir), "max_steps": 8, "micro_batch_size": 4, "gradient_accumulation": 2,
                  "learning_rate": 1e-2, "save_every": 3, "eval_every": 0.25, "logging_every": 1,
                  "save_total_limit": 2, **train},
        "fast": {"enabled": False},
    }
    return config_from_dict(raw)


def patch_data_layer(monkeypatch, data: Data | None = None, extra_pad: bool = False):
    """Stand-ins for the tokenizer/data modules (owned elsewhere) so these tests pin training only."""
    from llamaft.train import recipe

    tok = tokenizer(extra_pad)
    rules = Rules(pad_id=tok.pad_token_id, added_tokens=["<|pad|>"] if extra_pad else [])
    calls = []

    def save_tok(t, r, out):
        from transformers import GenerationConfig

        t.save_pretrained(out)
        GenerationConfig(eos_token_id=list(r.stop_ids), pad_token_id=r.pad_id).save_pretrained(out)

    def build(data_cfg, t, r, splits=None):
        calls.append("build_datasets")
        return data or dataset()

    monkeypatch.setattr(recipe, "load_tokenizer", lambda m, d: (tok, rules))
    monkeypatch.setattr(recipe, "build_datasets", build)
    monkeypatch.setattr(recipe, "split_conversations", lambda data_cfg: None)
    monkeypatch.setattr(recipe, "save_tokenizer", save_tok)
    return tok, rules, calls
