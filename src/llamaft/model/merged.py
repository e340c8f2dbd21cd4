"""A run's adapter merged into its base, written as a model directory: the one merge that
`llamaft merge` / `export` (export/merge.py) and training from a run (model/from_run.py) share.

    staged = stage_merge("runs/sft", out, "bfloat16")   # out's staging sibling; the caller publishes it

QLoRA runs merge into the base loaded unquantized (16-bit): merging into 4-bit weights would round
the adapter away, and the dequantized base is what the adapter was trained to correct.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LlamaftError
from ..paths import clean_stale, remove, tmp_dir, write_errors
from .finite import first_nonfinite_in_files, first_nonfinite_param
from .inference import load_for_inference, resolve_source, torch_dtype
from .tokenizer import save_tokenizer


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


def stage_merge(run_dir: str | Path, out: Path, dtype: str = "bfloat16", *, max_shard_size: int | str = "5GB") -> Path:
    """base (+ adapter, merged) of a run written to out's staging sibling (see stage_model_dir), not
    yet renamed into place. Full fine-tuning runs: their model/ converted to `dtype`."""
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
