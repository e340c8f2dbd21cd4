"""Load a trained model for generation: a run directory (base + adapter) or a model directory.

    model, tokenizer, rules = load_for_inference("runs/demo")                 # base + LoRA adapter
    model, tokenizer, rules = load_for_inference("runs/demo", adapter=False)  # the base alone (before/after)
    model, tokenizer, rules = load_for_inference("runs/demo-merged")          # merged / any HF model dir

Chat, evaluation, merge and export all load through here, so "what the run means" is decided once:
the run's config snapshot rebuilds the base exactly as training saw it (tokenizer rules, added pad
token, resized embeddings), then the PEFT adapter goes on top. A run's base is looked up on this
machine (locate_base): `embedded:smollm2` in this machine's cache, a moved local base one line saying
what to edit in RUN/config.yaml.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LlamaftError
from .load import DTYPES
from .source import looks_like_path
from .tokenizer import TokenRules, detect_family, load_tokenizer, make_rules


@dataclass
class Source:
    """What a path points at (resolved before any weights load, so errors come early)."""

    kind: str                 # "adapter" (run with a PEFT adapter) | "full" (run with model/) | "model"
    run_dir: Path | None      # the run directory (holds config.yaml), None for plain model dirs
    weights: Path             # adapter dir, or the HF model dir


def is_run_dir(path: str | Path) -> bool:
    """A llamaft run directory with final weights: its config.yaml and adapter/ or model/."""
    p = Path(path)
    return (p / "config.yaml").is_file() and ((p / "adapter").is_dir() or (p / "model").is_dir())


def enclosing_run(path: str | Path) -> Path | None:
    """The run a path belongs to: the run directory itself, a checkpoint/adapter dir inside it, or
    RUN/merged and RUN/model-*.gguf (where merge, export and `llamaft demo` put their outputs)."""
    p = Path(path).expanduser().resolve()
    for candidate in [p, *list(p.parents)[:2]]:
        if is_run_dir(candidate):
            return candidate
    return None


def run_system_prompt(run_dir: Path | None) -> str:
    """The run's `data.system_prompt` (what it trained with), "" when there is none or no run."""
    if run_dir is None:
        return ""
    try:
        import yaml

        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
        return str((cfg.get("data") or {}).get("system_prompt") or "")
    except Exception:  # noqa: BLE001 - only a default; loading the run itself reports a broken config
        return ""


def is_model_dir(p: Path) -> bool:
    """A saved HF model directory: config.json and safetensors weights."""
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def resolve_source(path: str | Path) -> Source:
    """Classify `path`: run dir, adapter/checkpoint dir inside a run, or HF model dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LlamaftError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise LlamaftError(f"{p}: expected a run directory or a model directory, got a file")
    if (p / "config.yaml").is_file():
        if (p / "adapter" / "adapter_config.json").is_file():
            return Source("adapter", p, p / "adapter")
        if is_model_dir(p / "model"):
            return Source("full", p, p / "model")
        raise LlamaftError(f"{p}: {_why_no_weights(p)}")
    if (p / "adapter_config.json").is_file():
        # An adapter or checkpoint dir inside a run (RUN/adapter, RUN/checkpoints/checkpoint-N):
        # the base comes from the nearest config.yaml above it.
        for parent in list(p.parents)[:3]:
            if (parent / "config.yaml").is_file():
                return Source("adapter", parent, p)
        raise LlamaftError(f"{p}: adapter without a run config.yaml above it; pass the run directory")
    if is_model_dir(p):
        return Source("model", None, p)
    if (p / "config.json").is_file() and any(p.glob("*.bin")):
        raise LlamaftError(f"{p}: only pickle (.bin) weights found; llamaft loads safetensors only")
    raise LlamaftError(f"{p}: not a run directory (config.yaml + adapter/ or model/) nor a model directory (config.json + *.safetensors)")


def _why_no_weights(run: Path) -> str:
    """Why a run directory holds no final adapter/ or model/, as its summary.json tells it."""
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    status = summary.get("status") if isinstance(summary, dict) else None
    if status == "stopped_nonfinite":
        stopped = summary.get("stopped") or {}
        good = stopped.get("last_good_checkpoint")
        hint = f"use its last good checkpoint {good}" if good else "it saved no checkpoint before that"
        return (f"training stopped at step {stopped.get('step')} (loss or gradients not finite), so no final "
                f"weights were written; {hint}")
    if status == "interrupted":
        return "training was interrupted; resume it (train.resume=true) or pass one of its checkpoints"
    return "run directory has neither adapter/ nor model/ (did training finish? try a checkpoint)"


def torch_dtype(name: str | None, method: str = "lora") -> torch.dtype:
    """`None`/"auto" → bf16 on GPUs that support it; on CPU fp32 (fast, exact), except qlora runs, whose
    bases are large enough that 16-bit halves the memory that matters more there."""
    if name in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.bfloat16 if method == "qlora" else torch.float32
    if name not in DTYPES:
        raise LlamaftError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Rules for a model directory (merged output or any HF Llama-architecture model)


def rules_from_dir(model_dir: Path, tokenizer) -> TokenRules:
    """Rules of a saved model dir: the tokenizer module's family rules, plus every stop id that
    generation_config.json lists (merge writes them all; a foreign dir may list more)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(model_dir))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    family = detect_family(tokenizer, hf_config)
    try:
        rules = make_rules(tokenizer, family, bool(template), template, hf_config=hf_config)
    except LlamaftError:
        # No spare special token to pad with. Inference pads on the left under an attention mask,
        # so any id that is not a stop id will do (training would need a real pad token).
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        tokenizer.pad_token_id = next(i for i in reversed(range(len(tokenizer))) if i not in special)
        rules = make_rules(tokenizer, family, bool(template), template, hf_config=hf_config)
    gen_file = model_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else {}
    eos = gen.get("eos_token_id")
    extra = [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None and i not in rules.stop_ids]
    if rules.pad_id in extra:
        raise LlamaftError(f"{model_dir}: generation_config.json lists the pad id {rules.pad_id} as a stop id")
    rules.stop_ids = sorted([*rules.stop_ids, *extra])
    return rules


def _load_model_dir(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    rules = rules_from_dir(model_dir, tokenizer)
    tokenizer.pad_token_id = rules.pad_id
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer, rules


# ---------------------------------------------------------------------------------------------
# Run directories: rebuild the base from the config snapshot, then the adapter


def _adapter_vocab_size(adapter_dir: Path) -> int | None:
    """Rows of the embedding saved with the adapter (training added a pad token), if any."""
    from safetensors import safe_open

    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        return None
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():
            if "embed_tokens" in key and "lora_" not in key and key.endswith("weight"):
                return st.get_slice(key).get_shape()[0]
    return None


def load_run_base(cfg, tokenizer, rules, dtype: torch.dtype, adapter_dir: Path | None = None):
    """The base model of a run, unquantized (qlora bases too: inference and merges want 16-bit
    weights, and 4-bit needs CUDA), with embeddings sized as training left them."""
    from .load import load_base

    model_cfg = cfg.model.model_copy(update={"method": "lora" if cfg.model.method == "qlora" else cfg.model.method})
    model = load_base(model_cfg, cfg.quantization, rules, tokenizer, dtype)
    # Idempotent when load_base already resized: the adapter's saved embedding (or the tokenizer)
    # says how many rows training used.
    rows = (_adapter_vocab_size(adapter_dir) if adapter_dir else None) or len(tokenizer)
    if rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return model.to(dtype)


def locate_base(cfg, run_dir: Path):
    """The run's base as this machine finds it: `embedded:smollm2` resolved to this machine's cache of
    the embedded model (converted once), and one line, before any load, for a local base model,
    tokenizer or chat template that is not where config.yaml says (a run moved to another machine);
    a base that is another run: the model directory it trained on (model/from_run.py)."""
    from ..assets import resolve_model_name

    cfg.model.name = resolve_model_name(cfg.model.name)
    for key, value in (("model.name", cfg.model.name), ("model.tokenizer", cfg.model.tokenizer),
                       ("data.chat_template", cfg.data.chat_template)):
        local = key == "data.chat_template" or looks_like_path(value or "")
        if value and local and not Path(value).expanduser().exists():
            copied = _copied_from(value, run_dir)
            raise LlamaftError(f"{key}: {value} not found (the run {run_dir} was trained with it{copied}); put it back "
                               f"there, or set {key} in {Path(run_dir) / 'config.yaml'} to where it is now")
    from .from_run import run_base

    cfg.model = run_base(cfg.model, run_dir)  # model.name another run (e.g. DPO from SFT): the base it trained on
    return cfg


def _copied_from(path: str, run_dir: Path) -> str:
    """', a copy of ORIGIN' for a file train copied into the run (its data/sources.json), else ''."""
    from ..config import read_sources

    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return ""
    origin = read_sources(run_dir).get(rel, {}).get("origin")
    return f", a copy of {origin}" if origin else ""


def load_for_inference(path: str | Path, *, dtype: str | None = None, device: str | None = None, adapter: bool = True,
                       merge_adapter: bool = False):
    """(model, tokenizer, rules) ready for `llamaft.model.generate`; model in eval mode on `device`.

    path: a run directory, an adapter/checkpoint dir inside one, or a model directory.
    adapter=False on a run gives its base model (before/after comparisons); a stacked run's (model.from_run:
    stack) is the model it started from: its base with the frozen adapter merged.
    merge_adapter: fold a LoRA adapter into the (16/32-bit) base weights, the model `llamaft merge`
    writes: ~1/3 faster generation on CPU (no extra LoRA matmuls); off where the adapter must stay
    switchable (the web UI's base comparison uses disable_adapter()).
    """
    src = resolve_source(path)
    if src.kind == "model" or (src.kind == "full" and adapter):
        trust = False
        if src.run_dir is not None:
            from ..config import load_config

            trust = load_config(src.run_dir / "config.yaml", snapshot=True).model.trust_remote_code
        model, tokenizer, rules = _load_model_dir(src.weights, torch_dtype(dtype), trust)
    else:
        from ..config import load_config

        from .from_run import frozen_under

        cfg = load_config(src.run_dir / "config.yaml", snapshot=True)
        frozen = frozen_under(cfg.model)  # model.from_run: stack: the adapter the run's own went on (the SFT run's)
        cfg = locate_base(cfg, src.run_dir)
        tdtype = torch_dtype(dtype or cfg.model.dtype, cfg.model.method)
        tokenizer, rules = load_tokenizer(cfg.model, cfg.data)  # exactly as training built it
        model = load_run_base(cfg, tokenizer, rules, tdtype, src.weights if src.kind == "adapter" else None)
        if frozen is not None:  # the run's base is the model it started from: that adapter merged (16/32-bit base)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(frozen)).to(tdtype).merge_and_unload()
        if adapter and src.kind == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(src.weights), is_trainable=False)
            model = model.to(tdtype)
            if merge_adapter:
                model = model.merge_and_unload()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.config.use_cache = True  # load_base turns the KV cache off for training; generation needs it
    model = model.to(device).eval()
    return model, tokenizer, rules
