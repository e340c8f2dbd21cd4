"""`llamaft sweep`: check everything, create SWEEP/, run the trials (here, or one worker process per
GPU), then write the results. `llamaft sweep --resume SWEEP` continues from SWEEP/study.db.

    run_sweep(cfg, spec_raw, "sweep.yaml")     # cfg: the base RunConfig; spec_raw: the `sweep:` mapping
    resume_sweep("runs/x-sweep")

SWEEP/ holds sweep.json (the base config with absolute paths, and the spec: all a resume needs),
study.db (Optuna), cache/ (rows and token examples keyed by content, data/cache.py), trial-NNNN/ (one
ordinary run directory per trial), and the results (results.py, report.py). Only one process
coordinates a sweep directory at a time (.lock holds its pid).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import config_from_dict
from ..console import make_console
from ..data.sources import validation_sets
from ..errors import ConfigError, LlamaftError
from ..paths import check_output_dir, pid_alive, remove, write_text_atomic
from .spec import Spec, parse_spec
from .study import Budget, counted, open_study, recover_interrupted, running

STATE = "sweep.json"
LOCK = ".lock"


@dataclass
class Sweep:
    dir: Path
    base: dict  # the base run config as a dict, paths absolute
    spec: Spec
    spec_raw: dict
    source: str  # where the spec came from (error messages)

    @property
    def cache(self) -> Path:
        return self.dir / "cache"

    @property
    def set_names(self) -> list[str]:
        cfg = config_from_dict(self.base, "config")
        return list(validation_sets(cfg.data.validation)) or ["validation"]


def say(text: str) -> None:
    make_console().print(text, markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------
# start and resume


def run_sweep(cfg, spec_raw, source: str, out: str | None = None, workers: int | None = None) -> Path:
    """Check the spec, the data and the model (no weights) against the base config, create the sweep
    directory and run the trials. Returns the sweep directory."""
    base = absolute_paths(cfg)
    spec = parse_spec(spec_raw, base, source)
    sweep_dir = check_output_dir(out or spec.output_dir or f"{cfg.train.output_dir.rstrip('/')}-sweep",
                                 "--out" if out else "sweep.output_dir").resolve()  # trials record it: from any directory
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        hint = f"continue it with: llamaft sweep --resume {sweep_dir}" if (sweep_dir / STATE).is_file() else "choose another --out"
        raise LlamaftError(f"{sweep_dir} is not empty; {hint}")
    sweep = Sweep(sweep_dir, base, spec, spec_raw, source)
    created = not sweep_dir.exists()
    try:
        preflight(sweep, cfg)  # data read and tokenized (into the cache), model checked on the meta device
    except BaseException:
        if created:
            remove(sweep_dir)  # a spec, data or model error leaves nothing behind
        raise
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_dir / STATE, json.dumps({"base": base, "spec": spec_raw, "source": source}, indent=2))
    with locked(sweep_dir):
        study = open_study(sweep_dir, spec, create=True)
        for values in spec.start_with:
            study.enqueue_trial(values)
        say(f"sweep {sweep_dir}: {spec.method}, {spec.trials} trials, objective {spec.objective} ({spec.direction})")
        if spec.pruner["kind"] != "none" and cfg.train.eval_every == 0:
            say(f"note: pruner {spec.pruner['kind']} has nothing to act on: train.eval_every=0 evaluates only at the end")
        return _run(sweep, workers)


def resume_sweep(sweep_dir: str | Path, workers: int | None = None) -> Path:
    sweep = load_sweep(sweep_dir)
    with locked(sweep.dir):
        study = open_study(sweep.dir, sweep.spec)
        again = recover_interrupted(sweep.dir, study)
        say(f"resuming {sweep.dir}: {counted(study)} of {sweep.spec.trials} trials done"
            + (f"; running interrupted trial(s) {', '.join(map(str, again))} again" if again else ""))
        return _run(sweep, workers)


def load_sweep(sweep_dir: str | Path) -> Sweep:
    d = Path(sweep_dir).expanduser().resolve()
    try:
        state = json.loads((d / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LlamaftError(f"{d}: not a sweep directory (no readable {STATE})") from None
    return Sweep(d, state["base"], parse_spec(state["spec"], state["base"], state["source"]), state["spec"], state["source"])


def _run(sweep: Sweep, workers: int | None) -> Path:
    from .results import write_results
    from .workers import plan_workers, run_workers

    per_trial = sweep.spec.gpus_per_trial
    devices = plan_workers(workers if workers is not None else sweep.spec.workers, per_trial)
    if per_trial > 1:
        say(f"each trial trains in {per_trial} processes ({'one per GPU' if devices[0] else 'gloo, on CPU'})")
    try:
        if len(devices) > 1:
            say(f"{len(devices)} workers, one trial each at a time (CUDA_VISIBLE_DEVICES: {' / '.join(d or '-' for d in devices)})")
            run_workers(sweep.dir, devices)
        else:
            work(sweep)
    except KeyboardInterrupt:
        write_results(sweep)  # what finished is ranked
        say(f"sweep interrupted; continue it with: llamaft sweep --resume {sweep.dir}")
        raise
    except BaseException:
        write_results(sweep)
        raise
    write_results(sweep)
    return sweep.dir


def preflight(sweep: Sweep, cfg) -> None:
    """What would fail every trial fails here, before any trains: bad rows, eval names, the model's
    files and LoRA targets (meta device), hardware: the checks `llamaft train` makes before its run
    directory exists (train/recipe.check_inputs). The base setting's rows are tokenized into the
    cache now, so that parallel workers find them there."""
    from ..train.recipe import check_hardware
    from ..train.setup import check_inputs

    check_hardware(cfg)
    data = check_inputs(cfg, sweep.cache).data
    if sweep.spec.set_name not in data.validation:
        raise ConfigError(f"{sweep.source}: sweep.objective: no validation set named '{sweep.spec.set_name}' "
                          f"(sets: {', '.join(data.validation) or 'none'})")


def absolute_paths(cfg) -> dict:
    """The config as a dict whose file paths hold from any working directory (a resumed sweep, best.yaml)."""
    raw = cfg.model_dump(mode="json")
    d = raw["data"]
    fix = lambda p: str(Path(p).resolve()) if p and Path(p).exists() else p  # noqa: E731
    d["train"] = [fix(p) for p in d["train"]]
    v = d["validation"]
    d["validation"] = fix(v) if isinstance(v, str) else [fix(p) for p in v] if isinstance(v, list) else \
        {k: fix(p) for k, p in v.items()} if isinstance(v, dict) else v
    d["test"], d["chat_template"] = fix(d["test"]), fix(d["chat_template"])
    raw["model"]["name"], raw["model"]["tokenizer"] = fix(raw["model"]["name"]), fix(raw["model"]["tokenizer"])
    return raw


class locked:
    """SWEEP/.lock holds the coordinating process's id while it runs: a second `llamaft sweep` on the
    same directory (which would fail the first one's running trials as interrupted) is refused."""

    def __init__(self, sweep_dir: Path):
        self.path = Path(sweep_dir) / LOCK

    def __enter__(self):
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid_alive(pid):
            raise LlamaftError(f"{self.path.parent}: another llamaft sweep (pid {pid}) is running it")
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the trial loop (in this process, or in each worker process)


def work(sweep: Sweep, worker: int = 0) -> None:
    """Run trials until the budget (or the grid, or the time) is used up; `worker`: this process's index."""
    from .trial import run_trial

    study = open_study(sweep.dir, sweep.spec, worker=worker)
    if counted(study) + running(study) >= sweep.spec.trials:
        return
    set_names = sweep.set_names
    study.optimize(lambda t: run_trial(t, sweep, set_names), timeout=sweep.spec.timeout, catch=(LlamaftError,),
                   callbacks=[Budget(sweep.spec.trials), _said, _free_memory])


def _said(study, trial) -> None:
    """One line per finished trial."""
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.user_attrs.get("config", {}).items())
    state = trial.state.name.lower().replace("complete", "completed")
    what = f"{trial.value:.4g}" if trial.state.name == "COMPLETE" else trial.user_attrs.get("reason", "")
    say(f"trial {trial.number} {state} ({values}): {what}")


def _free_memory(_study, _trial) -> None:
    """On a GPU, the next trial in this process starts with the memory the last one held given back
    (on CPU a full collection costs more than it frees: the next trial's allocations reuse it)."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
