"""`llamaft export --format hf`: a standalone Hugging Face model directory (merged, 16-bit, sharded).

    export_hf("runs/demo", "exports/demo-hf", dtype="bfloat16", max_shard_size="2GB")

A run directory is merged (see merge.py); a model directory (already merged, or any HF Llama model)
is re-saved in the requested dtype and shard size, with our tokenizer files and a
generation_config.json that lists every stop id.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LlamaftError
from ..model.inference import load_for_inference, resolve_source, torch_dtype
from .merge import (check_out_dir, check_shard_size, merge, refuse_clobber, refuse_nonfinite_files,
                    refuse_nonfinite_model, write_model_dir)

from ..model.load import DTYPES as EXPORT_DTYPES  # noqa: E402 - the one dtype map


def export_hf(path: str | Path, out_dir: str | Path, dtype: str = "bfloat16", max_shard_size: int | str = "5GB",
              *, overwrite: bool = False) -> Path:
    """Write `path` (run dir or model dir) as a merged HF model directory; returns out_dir."""
    if dtype not in EXPORT_DTYPES:
        raise LlamaftError(f"export dtype '{dtype}' is not one of {', '.join(EXPORT_DTYPES)}")
    check_shard_size(max_shard_size)
    src = resolve_source(path)
    if src.kind != "model":
        return merge(path, out_dir, dtype, overwrite=overwrite, max_shard_size=max_shard_size)
    out = check_out_dir(out_dir, overwrite)
    refuse_clobber(out, src.weights)
    refuse_nonfinite_files(src.weights)
    model, tokenizer, rules = load_for_inference(path, dtype=dtype, device="cpu")
    model = model.to(torch_dtype(dtype))
    refuse_nonfinite_model(model, dtype, src.weights)
    return write_model_dir(model, tokenizer, rules, out, max_shard_size=max_shard_size, overwrite=overwrite)
