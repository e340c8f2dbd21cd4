"""Training from a llamaft run directory: `model.name: runs/sft` (an SFT run, or any finished run).

    model_cfg, started = start_from_run(cfg.model, say)   # (cfg.model, None) for any other model.name

A run with a LoRA / QLoRA adapter (`model.from_run: merge`): its adapter merged into its base in
bf16, exactly as `llamaft merge` does (model/merged.py), written once into
CACHE/from-run/<run>-<adapter hash> (staged, then renamed into place: a crash leaves nothing
behind) and reused while the adapter's files are unchanged. That directory is the base the new run
loads: a new LoRA / QLoRA adapter's reference (the adapter disabled) is exactly the SFT model, and
QLoRA quantizes the merged weights at load as usual. A full fine-tuning run: its model/ is the base.

The new run's config.yaml keeps `model.name: /abs/runs/sft` and its summary.json records where it
started (`started_from`: run, adapter hash, merged base). Loading the new run later (merge, export,
chat, eval: inference.locate_base calls run_base) finds the same merged base, rebuilds it from the
SFT run on a machine without it, and refuses an SFT adapter that changed since.

`model.from_run: continue`: no merge. The new run loads the SFT run's own base and trains the SFT
adapter itself further (model/adapters.apply_adapters, `started_from.adapter`); DPO's reference is
TRL's frozen "ref" copy of that adapter as loaded (train/preference.py). The new run's adapter is
then relative to the SFT run's base, which is what loading it later finds (run_base).

`model.from_run: stack`: no merge either. The new run loads the SFT run's own base, the SFT adapter
on it FROZEN (PEFT adapter "frozen", exactly as trained) and a NEW adapter from the lora section
("default", trained), both active (model/adapters.py). DPO's reference is the new adapter off (base
+ SFT adapter: the SFT model). adapter/ and checkpoints hold the new adapter only; loading the run
later puts the SFT adapter (`frozen_under`; refused if it changed since) under it (inference.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlamaftError
from .inference import is_model_dir

MERGE_DTYPE = "bfloat16"  # what `llamaft merge` writes by default
CACHE_SUBDIR = "from-run"


@dataclass
class StartRun:
    """The run model.name points at."""

    path: Path        # what model.name names: a run directory, or an adapter / checkpoint dir inside one
    kind: str         # "adapter" (LoRA / QLoRA) | "full" (its model/ holds the weights)
    weights: Path     # the adapter dir, or RUN/model
    key: str | None   # the adapter's content hash (adapter runs): names its merged base in the cache
    run_dir: Path | None = None  # the run directory (its config.yaml names its base)


def find_run(name: str, hashed: bool = True) -> StartRun | None:
    """The llamaft run `name` names, or None (hub ids, model directories, GGUF files). A run without
    final weights (interrupted, stopped, still training) is one line saying why. `hashed=False`: no
    adapter hash (`key` None) for a caller that needs only where the weights are."""
    from .inference import resolve_source

    p = Path(name).expanduser()
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    if not ((p / "config.yaml").is_file() or (p / "adapter_config.json").is_file()):
        return None
    try:
        src = resolve_source(p)
    except LlamaftError as err:
        raise LlamaftError(f"model.name: {err}") from None
    if src.kind == "model":
        return None
    key = adapter_key(src.weights) if src.kind == "adapter" and hashed else None
    return StartRun(p.resolve(), src.kind, src.weights.resolve(), key, src.run_dir and Path(src.run_dir).resolve())


def adapter_key(weights: Path) -> str:
    """sha256 (16 hex digits) of an adapter's config and weights: a retrained adapter gets a new key."""
    h = hashlib.sha256()
    for f in sorted([weights / "adapter_config.json", *weights.glob("*.safetensors")]):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def cache_path(start: StartRun) -> Path:
    from ..assets import cache_dir

    run = start.weights.parent if start.weights.name == "adapter" else start.weights
    return cache_dir() / CACHE_SUBDIR / f"{run.name}-{start.key}"


def merged_base(start: StartRun, say=None) -> Path:
    """The run's adapter merged into its base: the cached directory, written first if absent."""
    from ..paths import check_output_dir, publish_dir, remove
    from .merged import stage_merge

    out = cache_path(start)
    if is_model_dir(out):
        return out
    check_output_dir(out, "the merged base's cache (LLAMAFT_CACHE)")
    (say or _stderr)(f"model.name: merging the adapter of {start.path} into its base ({MERGE_DTYPE}), once, into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = stage_merge(start.path, out, MERGE_DTYPE)
    if is_model_dir(out):  # another run merged the same adapter meanwhile: never swap a base under its feet
        remove(staged)
        return out
    return publish_dir(staged, out)


def start_from_run(model_cfg, say=None, start: StartRun | None = None):
    """(model config to load, `started_from` record or None): model.name a run → its base directory.
    `start`: find_run(model_cfg.name) when the caller has it already."""
    start = start or find_run(model_cfg.name)
    if start is None:
        return model_cfg, None
    if start.kind == "adapter" and model_cfg.from_run in ("continue", "stack"):
        return _on_own_base(model_cfg, start)
    base = start.weights if start.kind == "full" else merged_base(start, say)
    started = {"run": str(start.path), "kind": start.kind, "adapter_sha256": start.key, "base": str(base),
               **({"from_run": model_cfg.from_run, "dtype": MERGE_DTYPE} if start.kind == "adapter" else {})}
    return model_cfg.model_copy(update={"name": str(base), "gguf_file": None, "revision": None}), started


def _on_own_base(model_cfg, start: StartRun):
    """The SFT run's own base (as loading that run finds it); its adapter to train further (continue)
    or to keep frozen under a new one (stack)."""
    from ..config import load_config
    from .inference import locate_base

    mode = model_cfg.from_run
    if model_cfg.method == "full":
        what = "trains the LoRA adapter of" if mode == "continue" else "trains a new LoRA adapter on the frozen adapter of"
        raise LlamaftError(f"model.from_run: {mode} {what} {start.path}: use model.method lora or qlora "
                           f"(or from_run: merge for full fine-tuning on it merged)")
    if start.run_dir is None:
        raise LlamaftError(f"model.from_run: {mode} needs a llamaft run directory (its config.yaml names the base); "
                           f"{start.path} has none")
    base = locate_base(load_config(start.run_dir / "config.yaml", snapshot=True), start.run_dir).model
    update = {"name": base.name, "gguf_file": base.gguf_file, "revision": base.revision,
              "tokenizer": model_cfg.tokenizer or base.tokenizer}
    started = {"run": str(start.path), "kind": "adapter", "adapter_sha256": start.key, "from_run": mode,
               "adapter": str(start.weights), "base": base.name}
    return model_cfg.model_copy(update=update), started


def continued_adapter(started: dict | None) -> Path | None:
    """The adapter a run trains further (`model.from_run: continue`), or None."""
    return Path(started["adapter"]) if started and started.get("from_run") == "continue" else None


def frozen_adapter(started: dict | None) -> Path | None:
    """The adapter a run keeps frozen under the one it trains (`model.from_run: stack`), or None."""
    return Path(started["adapter"]) if started and started.get("from_run") == "stack" else None


def frozen_under(model_cfg) -> Path | None:
    """The adapter a stacked run's own adapter goes on when it is loaded (model.name as config.yaml
    names it: the SFT run), or None for any other run; run_base refuses it if it changed (and hashes it:
    not here too)."""
    start = find_run(model_cfg.name, hashed=False) if model_cfg.from_run == "stack" else None
    return start.weights if start is not None and start.kind == "adapter" else None


def as_named(cfg, started: dict | None):
    """A run config whose model.name was resolved by start_from_run, with the run the user named back."""
    if started is None:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": started["run"]})})


def run_base(model_cfg, run_dir: Path):
    """The base a run trained on, when its model.name is another run: the merged base it recorded
    (summary.json's started_from) if it is still there, else rebuilt from that run, whose adapter
    must be the one it trained from."""
    if model_cfg.from_run == "continue":  # the new adapter is relative to that run's own base
        return start_from_run(model_cfg)[0]
    record = _started_from(run_dir)
    if model_cfg.from_run == "stack":  # that run's own base, its adapter under the new one: exactly as trained on
        start = find_run(model_cfg.name)
        _refuse_changed(start and start.path, start and start.key, record, run_dir)
        return start_from_run(model_cfg, start=start)[0]
    recorded = Path(record.get("base") or "")
    if record.get("run") == str(Path(model_cfg.name).expanduser().resolve()) and is_model_dir(recorded):
        return model_cfg.model_copy(update={"name": str(recorded), "gguf_file": None, "revision": None})
    start = find_run(model_cfg.name)
    _refuse_changed(start and start.path, start and start.key, record, run_dir)
    return start_from_run(model_cfg, start=start)[0]


def check_resumed(started: dict | None, run_dir: Path) -> None:
    """A stacked run resumed: its checkpoint's adapter was trained on the frozen adapter's exact weights
    (what the run's summary.json recorded when it was interrupted or stopped)."""
    if started and started.get("from_run") == "stack":
        _refuse_changed(started["run"], started["adapter_sha256"], _started_from(run_dir), run_dir)


def _refuse_changed(path, key: str | None, record: dict, run_dir: Path) -> None:
    if path is not None and record.get("adapter_sha256") and key != record["adapter_sha256"]:
        raise LlamaftError(f"model.name: the adapter of {path} changed since {run_dir} trained from it "
                           f"(sha256 {record['adapter_sha256']}, now {key}); put the original adapter back")


def _started_from(run_dir: Path) -> dict:
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    record = summary.get("started_from") if isinstance(summary, dict) else None
    return record if isinstance(record, dict) else {}


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
