"""Merge a run's LoRA adapter into its base: one 16-bit model directory that plain transformers loads.

    llamaft merge runs/demo --out runs/demo-merged
    merge("runs/demo", "runs/demo-merged", dtype="bfloat16")

The output holds safetensors weights, the tokenizer with its chat template, and a
generation_config.json whose eos_token_id lists every stop id (Llama 3.1 Instruct: 128001, 128008,
128009), so `AutoModelForCausalLM.from_pretrained(out).generate(...)` stops where our chat does.
It is written to a temporary sibling directory (`.NAME.tmp-PID`) and renamed into place: a crash
never leaves a half-written model behind, an existing output is only replaced by a complete one,
and the sibling a killed merge leaves is removed by the next merge or export into the same place.
A full disk or unwritable --out is one line naming it (paths.py), checked before the model loads.

The merge itself (model/merged.py) is shared with training from a run (`model.name: runs/sft`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LlamaftError
from ..model.inference import resolve_source
from ..model.merged import (refuse_nonfinite_files, refuse_nonfinite_model, stage_merge,  # noqa: F401 - export's names
                            stage_model_dir)
from ..paths import check_output_dir, clean_stale, publish_dir

from ..model.load import DTYPES  # noqa: E402 - the one dtype map (name -> torch dtype)


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Fail before any model loads when the output would clobber something or cannot be written
    (a file, under a file, read-only, no permission). Staging dirs that killed runs left beside it
    (`.NAME.tmp-PID`, model-sized) are removed here, before they can fill the disk."""
    out = check_output_dir(out_dir)
    clean_stale(out.resolve())
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LlamaftError(f"{out}: directory is not empty; choose another --out or pass --overwrite")
    return out


def refuse_clobber(out: Path, source: Path) -> None:
    """With overwrite=True, out must still not be the source nor a folder that contains it."""
    o, s = out.resolve(), source.resolve()
    if o == s or o in s.parents:
        raise LlamaftError(f"{out}: would overwrite the input {source}; choose another output directory")


def write_model_dir(model, tokenizer, rules, out_dir: str | Path, *, max_shard_size: int | str = "5GB",
                    overwrite: bool = False) -> Path:
    """Save weights (safetensors, sharded) + tokenizer + generation config atomically into out_dir."""
    out = check_out_dir(out_dir, overwrite).resolve()
    return publish_dir(stage_model_dir(model, tokenizer, rules, out, max_shard_size=max_shard_size), out)


def check_shard_size(max_shard_size: int | str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(max_shard_size) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise LlamaftError(f"max shard size '{max_shard_size}' is not a size like 5GB, 500MB or a byte count") from None


def merge(run_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16", *, overwrite: bool = False,
          max_shard_size: int | str = "5GB") -> Path:
    """base (+ adapter, merged) of a run → a standalone model directory; returns its path.

    Full fine-tuning runs have no adapter: their model/ is converted to `dtype` and re-saved.
    """
    if dtype not in DTYPES:
        raise LlamaftError(f"merge dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    check_shard_size(max_shard_size)
    src = resolve_source(run_dir)
    if src.kind == "model":
        raise LlamaftError(f"{run_dir}: a model directory has no adapter to merge; use `llamaft export --format hf` to re-save it")
    out = check_out_dir(out_dir, overwrite)
    refuse_clobber(out, src.run_dir)
    return publish_dir(merge_staged(run_dir, out, dtype, max_shard_size=max_shard_size), out.resolve())


def merge_staged(run_dir: str | Path, out: Path, dtype: str = "bfloat16", *, max_shard_size: int | str = "5GB") -> Path:
    """The merge written to out's staging sibling, not yet renamed into place (model/merged.py):
    `export --format gguf` converts from it and publishes it only when the GGUF was written."""
    return stage_merge(run_dir, out, dtype, max_shard_size=max_shard_size)
