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

QLoRA runs merge into the base loaded unquantized (16-bit): merging into 4-bit weights would round
the adapter away, and the dequantized base is what the adapter was trained to correct.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LlamaftError
from ..model.finite import first_nonfinite_in_files, first_nonfinite_param
from ..model.inference import load_for_inference, resolve_source, torch_dtype
from ..model.tokenizer import save_tokenizer
from ..paths import check_output_dir, clean_stale, publish_dir, remove, tmp_dir, write_errors

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


def check_shard_size(max_shard_size: int | str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(max_shard_size) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise LlamaftError(f"max shard size '{max_shard_size}' is not a size like 5GB, 500MB or a byte count") from None


def refuse_nonfinite_files(weights_dir: Path) -> None:
    """Before any model loads: NaN/Inf in an adapter or model directory (a diverged run, or a
    checkpoint saved after it) must not become a model that loads and generates garbage."""
    hit = first_nonfinite_in_files(Path(weights_dir).glob("*.safetensors"))
    if hit is not None:
        path, tensor = hit
        raise LlamaftError(f"{path}: tensor {tensor} holds NaN/Inf values (training diverged?); nothing was "
                           "written; use an earlier checkpoint of the run")


def refuse_nonfinite_model(model, dtype: str, source) -> None:
    """After merging and casting: the weights about to be written must all be finite (a large
    merged weight can overflow float16)."""
    bad = first_nonfinite_param(model)
    if bad is not None:
        raise LlamaftError(f"{source}: weight {bad} is not finite in {dtype} (NaN/Inf, or too large for {dtype}); "
                           "nothing was written; try --dtype bfloat16 or an earlier checkpoint")


def write_model_dir(model, tokenizer, rules, out_dir: str | Path, *, max_shard_size: int | str = "5GB",
                    overwrite: bool = False) -> Path:
    """Save weights (safetensors, sharded) + tokenizer + generation config atomically into out_dir."""
    out = check_out_dir(out_dir, overwrite).resolve()
    return publish_dir(stage_model_dir(model, tokenizer, rules, out, max_shard_size=max_shard_size), out)


def stage_model_dir(model, tokenizer, rules, out: Path, *, max_shard_size: int | str = "5GB") -> Path:
    """Write the model directory into out's staging sibling `.NAME.tmp-PID` and return that; the
    caller renames it into place (paths.publish_dir) or removes it. A failed write (full disk,
    read-only, ...) leaves nothing and raises one line naming `out`."""
    clean_stale(out)
    tmp = tmp_dir(out)
    remove(tmp)
    try:
        with write_errors(out, cleanup=(tmp,)):
            out.parent.mkdir(parents=True, exist_ok=True)
            _drop_gguf_quantizer(model)
            # A run's base had its cache off for training; the shipped model should generate fast.
            model.config.use_cache = True
            model.config.pad_token_id = rules.pad_id
            model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
            # Tokenizer + chat template, then eos_token_id = all stop ids and pad_token_id = pad, merged
            # into the generation_config.json that save_pretrained just wrote.
            save_tokenizer(tokenizer, rules, tmp)
        _check_written(tmp, rules)
    except BaseException:
        remove(tmp)
        raise
    return tmp


def _drop_gguf_quantizer(model) -> None:
    """A base read from a GGUF file (the demo's SmolLM2) keeps transformers' GGUF quantizer attached,
    which refuses save_pretrained even when every weight was dequantized on load. Dense weights are
    an ordinary model: detach the quantizer so the merge saves as plain safetensors."""
    q = getattr(model, "hf_quantizer", None)
    if q is None or "gguf" not in str(getattr(q.quantization_config, "quant_method", "")).lower():
        return
    if getattr(q, "packed_modules", None):
        raise LlamaftError("the base model kept GGUF-packed weights (a GGUF kernel was used); merge on CPU "
                           "or load the base dequantized")
    q.remove_quantization_config(model)


def _check_written(d: Path, rules) -> None:
    """Catch silent regressions in what we hand to other tools (llama.cpp, vLLM, plain transformers)."""
    if not any(d.glob("*.safetensors")):
        raise RuntimeError(f"{d}: no safetensors weights were written")
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise RuntimeError(f"{d}: pickle weights were written")
    gen = json.loads((d / "generation_config.json").read_text(encoding="utf-8"))
    eos = gen.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    if sorted(eos) != sorted(rules.stop_ids) or gen.get("pad_token_id") != rules.pad_id:
        raise RuntimeError(f"{d}: generation_config.json has eos {eos} / pad {gen.get('pad_token_id')}, expected {rules.stop_ids} / {rules.pad_id}")


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
    """The merge written to out's staging sibling (see stage_model_dir), not yet renamed into place:
    `export --format gguf` converts from it and publishes it only when the GGUF was written."""
    src = resolve_source(run_dir)
    refuse_nonfinite_files(src.weights)  # before anything loads or is written
    # Loading in the target dtype costs no accuracy: PEFT computes the LoRA delta in fp32 and rounds
    # once when adding it, exactly as merging in fp32 and casting afterwards would; and it halves
    # the memory an 8B merge needs.
    model, tokenizer, rules = load_for_inference(run_dir, dtype=dtype, device="cpu")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(torch_dtype(dtype))
    refuse_nonfinite_model(model, dtype, src.weights)
    return stage_model_dir(model, tokenizer, rules, Path(out).resolve(), max_shard_size=max_shard_size)
