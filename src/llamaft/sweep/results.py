"""What a sweep leaves besides its trials: results.json / results.md (every trial, best first),
best.yaml (the winning config, `llamaft train SWEEP/best.yaml`), plots/ and report.md (report.py).

A row: trial number, state (completed / pruned / failed / interrupted), the swept keys' values (the
config's difference from the base), the objective (pruned: the last value reported, with the step),
the final evaluation of every set, seconds, tokens/s, steps, why it was pruned or failed, its run dir.
Order: completed trials by the objective, then pruned ones by their last value, then the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from ..config import config_from_dict
from ..paths import write_text_atomic
from ..train.callbacks import json_safe
from .spec import apply_params, get_key

BEST = "best.yaml"
_BOOKKEEPING = ("samples", "prompts_truncated")  # how many rows were generated for: in summary.json, not the table


def trial_rows(sweep, study) -> list[dict]:
    """One row per finished trial, best first (see the module docstring)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        run_dir = Path(t.user_attrs.get("run_dir", sweep.dir / f"trial-{t.number:04d}"))
        summary = _summary(run_dir)
        last = max(t.intermediate_values.items(), default=None)
        state = "interrupted" if t.user_attrs.get("interrupted") else \
            {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed"}[t.state.name]
        raw = apply_params(sweep.base, sweep.spec.params, t.params)  # the trial's config, built once
        rows.append({
            "trial": t.number, "state": state,
            "config": {p.key: get_key(raw, p.key) for p in sweep.spec.params},
            # a pruned trial: its last reported value (Optuna's value of a pruned trial), at that step
            "objective": t.value if state == "completed" else (last[1] if last and state == "pruned" else None),
            "objective_step": summary.get("steps") if state == "completed" else (last[0] if last and state == "pruned" else None),
            "eval": summary.get("eval") or {},
            "seconds": t.user_attrs.get("seconds", summary.get("runtime_s")),
            "tokens_per_s": (summary.get("throughput") or {}).get("tokens_per_s"),
            "steps": summary.get("steps"),
            "reason": t.user_attrs.get("reason"),
            "retry_of": t.user_attrs.get("retry_of"),
            "run_dir": str(run_dir),
        })
    sign = 1 if sweep.spec.direction == "minimize" else -1
    rank = {"completed": 0, "pruned": 1}
    return sorted(rows, key=lambda r: (rank.get(r["state"], 2), sign * _num(r["objective"]), r["trial"]))


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def _summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_results(sweep) -> dict:
    """results.json, results.md, best.yaml (when a trial completed), plots/ and report.md."""
    from .report import write_report
    from .study import open_study

    study = open_study(sweep.dir, sweep.spec)
    rows = trial_rows(sweep, study)
    best = rows[0] if rows and rows[0]["state"] == "completed" else None
    results = {"objective": sweep.spec.objective, "direction": sweep.spec.direction, "method": sweep.spec.method,
               "budget": sweep.spec.trials, "best": best, "trials": rows}
    write_text_atomic(sweep.dir / "results.json", json.dumps(json_safe(results), indent=2, allow_nan=False))
    write_text_atomic(sweep.dir / "results.md", table(rows, sweep.spec) + "\n")
    if best is not None:
        write_best(sweep, study.trials[best["trial"]].params, best)
    write_report(sweep, study, rows, best)
    return results


def write_best(sweep, params: dict, best: dict) -> Path:
    """best.yaml: the base config with the best trial's values, training into SWEEP/best."""
    from .trial import trial_config

    raw = trial_config(sweep.base, sweep.spec, params, (sweep.dir / "best").resolve())
    cfg = config_from_dict(raw, BEST)  # valid, as every trial's config was
    head = (f"# best trial of the sweep {sweep.dir.resolve()}: trial {best['trial']}, {sweep.spec.objective} = "
            f"{best['objective']:.6g}\n# swept: {', '.join(f'{k}={v}' for k, v in best['config'].items())}\n"
            f"# train it again: llamaft train {sweep.dir / BEST}\n")
    return write_text_atomic(sweep.dir / BEST, head + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict], spec) -> str:
    """The markdown table: the swept keys, the objective, every other final metric, time, tokens/s."""
    keys = [p.key for p in spec.params]
    metrics = sorted({f"{s}/{m}" for r in rows for s, ms in r["eval"].items() for m in ms
                      if f"eval/{s}/{m}" != spec.objective and isinstance(ms[m], (int, float)) and m not in _BOOKKEEPING})
    head = ["trial", "state", *keys, f"{spec.objective} ({spec.direction[:3]})", *metrics, "s", "tokens/s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        objective = _fmt(r["objective"]) + (f" @ step {r['objective_step']}" if r["state"] == "pruned" and r["objective_step"] else "")
        cells = [str(r["trial"]), r["state"], *(_fmt(r["config"].get(k)) for k in keys), objective,
                 *(_fmt(r["eval"].get(m.split("/")[0], {}).get(m.split("/", 1)[1])) for m in metrics),
                 _fmt(r["seconds"]), _fmt(r["tokens_per_s"]), _note(r)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _note(r: dict) -> str:
    note = (r["reason"] or "").splitlines()[0][:160] if r["state"] != "completed" else ""
    return note + (f" (retry of trial {r['retry_of']})" if r.get("retry_of") is not None else "")
