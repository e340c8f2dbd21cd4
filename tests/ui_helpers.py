"""A tiny LoRA run for the web UI tests whose replies are readable: letters and spaces only.

A random tiny model emits random bytes (control characters, broken UTF-8, Markdown syntax), which a
browser cannot show verbatim. Zeroing every lm_head row except letters and space gives those tokens
logit 0, below the largest of ~53 random logits, so greedy decoding only ever writes [A-Za-z ] and
the page text can be compared with `stream_chat`'s output exactly. LoRA leaves lm_head alone, so
the adapter run and its base both keep the property.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from inference_helpers import make_run_dir, tiny_tokenizer

SUMMARY = {
    "model": "tiny-base", "method": "lora", "train_loss": 1.2345, "steps": 7, "epochs": 1.0, "precision": "fp32",
    "eval": {"capitals_val": {"loss": 1.5}},
    "before": {"capitals_val": {"loss": 3.25, "exact_match": 0.1}},
    "after": {"capitals_val": {"loss": 1.5, "exact_match": 0.75}},
    "data": {"train": {"rows": 9, "examples": 8}},
}


def letters_only_run(root: Path, system_prompt: str | None = "Answer briefly.") -> Path:
    run = make_run_dir(root)
    weights = root / "base" / "model.safetensors"
    tensors = load_file(str(weights))
    tok = tiny_tokenizer()
    keep = tok.convert_tokens_to_ids(list(string.ascii_letters) + ["Ġ"])  # Ġ: byte-level space
    mask = torch.zeros(tensors["lm_head.weight"].shape[0], dtype=torch.bool)
    mask[keep] = True
    tensors["lm_head.weight"][~mask] = 0.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    if system_prompt is not None:
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["data"]["system_prompt"] = system_prompt
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    return run
