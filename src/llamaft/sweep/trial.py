"""One trial: the base config with the trial's values, trained by the ordinary `train()` into
SWEEP/trial-NNNN, its evaluations reported to Optuna so the pruner can stop it early.

How a trial ends, in Optuna and in its run directory:
- complete: the objective is the final evaluation's value in summary.json;
- pruned by the pruner: training stops after that evaluation, the run is saved as usual (adapter,
  summary, report), and summary.json says `"status": "pruned"` with `"pruned": {step, value, reason}`;
- diverged (a NaN/Inf loss or gradient, train/nonfinite.py): the run's own `stopped_nonfinite`
  summary; Optuna records it as pruned, with the reason;
- failed: an error of this trial's values (e.g. out of memory at a large rank): failed with the
  one-line reason; the sweep goes on;
- interrupted (Ctrl-C, SIGTERM, the sweep killed): failed and marked `interrupted`; a resumed sweep
  runs its values again (study.py).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

from ..config import config_from_dict
from ..errors import LlamaftError, TrainingDiverged
from ..eval.report import write_report
from ..paths import write_text_atomic
from ..train import train
from ..train.callbacks import rename_logs
from .spec import Param, Spec, apply_params, get_key


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return Path(sweep_dir) / f"trial-{number:04d}"


def suggest(trial, params: list[Param]) -> dict:
    """The trial's values by Param.name, asked of Optuna's sampler."""
    values = {}
    for p in params:
        if p.kind in ("values", "factor_of"):
            values[p.name] = trial.suggest_categorical(p.name, p.choices)
        elif p.kind == "int":
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=p.step)
        else:
            values[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), log=p.kind == "log_uniform")
    return values


def trial_config(base: dict, spec: Spec, values: dict, out_dir: Path) -> dict:
    """The run config (a dict) of a trial: base + values, its own output directory, a fresh run."""
    raw = apply_params(base, spec.params, values)
    raw["train"]["output_dir"] = str(out_dir)
    raw["train"]["resume"] = False
    return raw


def swept_values(raw: dict, spec: Spec) -> dict:
    """{config key: value} of the swept keys in a trial's config (a factor_of key: the product)."""
    return {p.key: get_key(raw, p.key) for p in spec.params}


class ReportToOptuna(TrainerCallback):
    """Each evaluation's objective goes to the Optuna trial; when the pruner says so, training stops
    after that evaluation (the run is then saved as usual)."""

    def __init__(self, trial, objective: str, set_names: list[str], pruner: str):
        self.trial, self.objective, self.set_names, self.pruner = trial, objective, set_names, pruner
        self.pruned: dict | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.trial is None:  # a trial of several processes: rank 0 reports; its stop is every rank's
            return
        value = rename_logs(dict(logs or {}), self.set_names).get(self.objective)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or self.pruned:
            return
        step = state.global_step
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned = {"step": step, "value": value, "reason": self._reason(step, value)}
            control.should_training_stop = True

    def _reason(self, step: int, value: float) -> str:
        said = f"pruned at step {step}: {self.objective} = {value:.4g}"
        if self.pruner == "median":
            others = [t.intermediate_values[step] for t in self.trial.study.get_trials(deepcopy=False)
                      if t.number != self.trial.number and step in t.intermediate_values]
            median = f" ({statistics.median(others):.4g})" if others else ""
            return f"{said}, worse than the median{median} of the earlier trials at that step (median pruner)"
        return f"{said}, not among the best at this rung (successive halving pruner)"


def run_trial(trial, sweep, set_names: list[str]) -> float:
    """Optuna objective: train one trial, in this process or in spec.gpus_per_trial processes
    (processes.py); return its objective (raises optuna.TrialPruned / LlamaftError / KeyboardInterrupt)."""
    import optuna

    spec: Spec = sweep.spec
    out = trial_dir(sweep.dir, trial.number)
    raw = trial_config(sweep.base, spec, suggest(trial, spec.params), out)
    for key, value in {"run_dir": str(out), "config": swept_values(raw, spec), "worker": os.getpid(),
                       "devices": os.environ.get("CUDA_VISIBLE_DEVICES")}.items():
        trial.set_user_attr(key, value)
    started = time.time()
    try:
        if spec.gpus_per_trial > 1:
            from .processes import train_in_processes

            pruned = train_in_processes(trial, sweep)
        else:
            pruned = train_trial(trial, trial.number, raw, sweep, set_names)
    finally:
        trial.set_user_attr("seconds", round(time.time() - started, 2))
    if pruned:
        raise optuna.TrialPruned(pruned)
    return objective_value(out, spec, trial)


def train_trial(trial, number: int, raw: dict, sweep, set_names: list[str]) -> str | None:
    """train() of the trial's config `raw`, each evaluation reported to `trial` (None: a process of a
    trial of several other than rank 0, which alone reports and records). Returns why the pruner
    stopped it (None: it ran to the end); how it ended otherwise is noted in the trial and raised:
    diverged (optuna.TrialPruned), failed (LlamaftError), interrupted (KeyboardInterrupt)."""
    import optuna

    out = Path(raw["train"]["output_dir"])
    report = ReportToOptuna(trial, sweep.spec.objective, set_names, sweep.spec.pruner["kind"])
    try:
        train(config_from_dict(raw, f"trial {number}"), callbacks=[report], data_cache=sweep.cache)
    except TrainingDiverged as err:
        _note(trial, reason=f"diverged: {err}")
        raise optuna.TrialPruned(str(err)) from None
    except KeyboardInterrupt:
        _note(trial, interrupted=True, reason="interrupted: the sweep stopped during this trial")
        raise
    except LlamaftError as err:
        _note(trial, reason=str(err))
        raise
    if report.pruned is None:
        return None
    mark_pruned(out, report.pruned)
    _note(trial, reason=report.pruned["reason"])
    return report.pruned["reason"]


def _note(trial, **attrs) -> None:
    for key, value in attrs.items():
        if trial is not None:
            trial.set_user_attr(key, value)


def objective_value(run_dir: Path, spec: Spec, trial) -> float:
    """The final evaluation's value of the objective, from the run's summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    value = summary.get("eval", {}).get(spec.set_name, {}).get(spec.metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        reason = f"{spec.objective} is {value!r} in {run_dir / 'summary.json'}: no finite value to rank"
        trial.set_user_attr("reason", reason)
        raise LlamaftError(reason)
    return float(value)


def mark_pruned(run_dir: Path, pruned: dict) -> None:
    """summary.json of a pruned trial says so: status "pruned", and the step, value and reason (and
    report.md, which shows the summary's status, is written again)."""
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary.update({"status": "pruned", "pruned": pruned})
    write_text_atomic(path, json.dumps(summary, indent=2, allow_nan=False))
    write_report(Path(run_dir))
