"""metrics.jsonl: every HF log event, renamed to our keys; strict JSON (no bare NaN/Infinity).

    {"step": 10, "epoch": 0.5, "train/loss": 2.31, "train/learning_rate": 0.0002, "train/grad_norm": 1.7}
    {"step": 10, "epoch": 0.5, "eval/validation/loss": 2.40, "eval/validation/runtime_s": 0.8}
    {"step": 11, "epoch": 0.55, "train/loss": null, "train/grad_norm": null, ..., "nonfinite": {"train/loss": "nan", "train/grad_norm": "nan"}}

A value that is not a finite number is written as null, and the row's "nonfinite" object says which
keys those were and what they held ("nan", "inf", "-inf"): readers that skip nulls keep working, and
the plot can still show the step as diverged.

HF names a set's metrics `eval_<set>_<metric>` (eval_dataset is a dict); set names may contain `_`,
so the callback is told the names and matches the longest one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

_TRAIN_KEYS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}
_RENAME = {"runtime": "runtime_s"}


def json_safe(value):
    """Non-finite floats → None, through dicts and lists (for json.dumps(..., allow_nan=False))."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def rename_logs(logs: dict, set_names: list[str]) -> dict:
    """HF log keys → ours; values that are not finite numbers become null (JSON has no NaN) and are
    listed under "nonfinite"."""
    out: dict = {}
    nonfinite: dict = {}
    by_length = sorted(set_names, key=len, reverse=True)
    for key, value in logs.items():
        if key == "epoch":
            continue
        if key in _TRAIN_KEYS:
            new = _TRAIN_KEYS[key]
        elif key.startswith("eval_"):
            rest = key[len("eval_"):]
            name = next((n for n in by_length if rest.startswith(n + "_")), None)
            if name is None:  # a single unnamed eval set
                name, metric = "validation", rest
            else:
                metric = rest[len(name) + 1:]
            new = f"eval/{name}/{_RENAME.get(metric, metric)}"
        elif key.startswith("train_"):  # end-of-training summary (train_loss = mean over the run)
            metric = key[len("train_"):]
            new = "train/mean_loss" if metric == "loss" else f"train/{_RENAME.get(metric, metric)}"
        else:
            new = f"train/{key}"
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite[new] = str(value)  # "nan", "inf", "-inf"
            value = None
        out[new] = value
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


class MetricsJsonlCallback(TrainerCallback):
    """Appends one JSON line per log event to RUN/metrics.jsonl."""

    def __init__(self, path: str | Path, set_names: list[str]):
        self.path = Path(path)
        self.set_names = list(set_names)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch, 6) if state.epoch is not None else None}
        row.update(rename_logs(logs, self.set_names))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """On resume, drop lines logged after the checkpoint: they will be logged again."""
    p = Path(path)
    rows = [r for r in read_metrics(p) if r.get("step", 0) <= last_step and "train/mean_loss" not in r]
    tmp = p.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(p)
