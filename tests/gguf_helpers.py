"""Model directories for the GGUF tests: SmolLM2's real tokenizer (from the embedded GGUF, cached) and
tiny random Llamas saved like a merged run (tests/export/, tests/export/test_gguf_llamacpp.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (from the embedded GGUF) saved as an HF dir, cached: the GGUF parse is slow."""
    from transformers import AutoTokenizer

    from llamaft.assets import cache_dir, smollm2_gguf

    target = cache_dir() / "test-assets" / "smollm2-tokenizer-v1"
    if not (target / "tokenizer.json").is_file():
        src = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        tok.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_model_dir(out: Path, kind: str, *, std: float = 0.02, seed: int = 0) -> Path:
    """A tiny random Llama saved like a merged run: safetensors + tokenizer + generation_config.

    kind: "llama31" (real 128,256 Llama 3.1 tokenizer, llama3 rope scaling, GQA, untied head) or
    "smollm2" (SmolLM2's 49,152 tokenizer + ChatML template, tied embeddings, rope theta 1e5).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llamaft.model.tokenizer import llama3_tokenizer, make_rules, save_tokenizer, template_text

    if kind == "llama31":
        tok = llama3_tokenizer("3.1")
        tok.eos_token = "<|eot_id|>"
        rules = make_rules(tok, "llama3.1", True, template_text("llama3.1"))
        cfg = dict(vocab_size=128256, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_position_embeddings=131072,
                   tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                   num_attention_heads=4, num_key_value_heads=2)
    else:
        tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
        tok.eos_token = "<|im_end|>"
        rules = make_rules(tok, "other", True, tok.chat_template)
        cfg = dict(vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, rms_norm_eps=1e-5,
                         initializer_range=std, **cfg)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a norm written to the wrong tensor shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            p.copy_(p.half().float())  # f16-exact weights: an f16 export loses nothing against fp32 HF
    model.save_pretrained(str(out))
    save_tokenizer(tok, rules, out)
    return out
