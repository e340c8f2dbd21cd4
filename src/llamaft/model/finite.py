"""Are the weights finite? One answer for training (before a checkpoint is published) and export
(before a merged model or GGUF is written): a diverged run must never leave NaN/Inf weights behind
that look like a result.

    name = first_nonfinite_param(model, trainable_only=True)      # None: all finite
    hit = first_nonfinite_in_files(Path("runs/x/adapter").glob("*.safetensors"))  # (file, tensor) or None
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch


def is_finite(t: torch.Tensor) -> bool:
    # Integer tensors (quantised storage, index buffers) cannot hold NaN/Inf.
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t).all())


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first tensor holding a NaN or Inf (one tensor at a time: no big temporaries)."""
    for name, t in named:
        if not is_finite(t.detach()):
            return name
    return None


def first_nonfinite_param(model, trainable_only: bool = False) -> str | None:
    params = ((n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only)
    return first_nonfinite(params)


def first_nonfinite_in_files(files: Iterable[Path]) -> tuple[Path, str] | None:
    """(file, tensor) of the first non-finite tensor in safetensors files, read tensor by tensor so an
    8B model is checked without loading it whole."""
    from safetensors import safe_open

    for path in sorted(files):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if not is_finite(f.get_tensor(key)):
                    return path, key
    return None
