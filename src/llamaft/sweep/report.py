"""SWEEP/report.md and SWEEP/plots/: a page to paste into a discussion.

plots/objective_vs_<key>.png   the objective of every trial against each swept key (pruned: their last value, hollow)
plots/learning_curves.png      the objective at every evaluation of every trial, on one chart
plots/importance.png           parameter importance (Optuna's get_param_importances), once
                               MIN_FOR_IMPORTANCE trials completed and more than one key is swept
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from ..paths import write_text_atomic
from ..train.callbacks import read_metrics
from .results import BEST, table

log = logging.getLogger(__name__)

MIN_FOR_IMPORTANCE = 3


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def plot_objective_vs_params(sweep, rows: list[dict], out: Path) -> list[Path]:
    plt = _plt()
    paths = []
    for p in sweep.spec.params:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for state, marker in (("completed", "o"), ("pruned", "o")):
            pts = [(r["config"][p.key], r["objective"]) for r in rows
                   if r["state"] == state and isinstance(r["objective"], (int, float)) and math.isfinite(r["objective"])]
            if not pts:
                continue
            xs = [x if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x) for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], marker=marker, label=state,
                       facecolors="none" if state == "pruned" else None, edgecolors="grey" if state == "pruned" else None)
        if p.kind == "log_uniform" or (p.kind == "values" and _spans_decades(p.values)):
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(sweep.spec.objective)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"objective_vs_{_slug(p.key)}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def _spans_decades(values: list) -> bool:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    return len(nums) == len(values) and len(nums) > 1 and max(nums) / min(nums) >= 100


def plot_learning_curves(sweep, rows: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        curve = _curve(Path(r["run_dir"]) / "metrics.jsonl", sweep.spec.objective)
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=f"trial {r['trial']}",
                    linestyle="-" if r["state"] == "completed" else ":")
    ax.set_xlabel("step")
    ax.set_ylabel(sweep.spec.objective)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curve(metrics: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(metrics) if isinstance(r.get(key), (int, float))]


def importance(sweep, study) -> dict[str, float] | None:
    """Optuna's parameter importances over the completed trials (None: too few, or one key)."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_FOR_IMPORTANCE or len(sweep.spec.params) < 2:
        return None
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ImportError) as err:  # e.g. every completed trial has the same values
        log.info("no parameter importance: %s", err)
        return None


def plot_importance(imp: dict[str, float], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * len(imp)))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("importance (share of the objective's variance)")
    fig.tight_layout()
    path = out / "importance.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(sweep, study, rows: list[dict], best: dict | None) -> Path:
    plots = sweep.dir / "plots"
    plots.mkdir(exist_ok=True)
    images = plot_objective_vs_params(sweep, rows, plots) + [plot_learning_curves(sweep, rows, plots)]
    imp = importance(sweep, study)
    if imp:
        images.append(plot_importance(imp, plots))
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in ("completed", "pruned", "failed", "interrupted")}
    spec = sweep.spec
    lines = [f"# Sweep: {spec.objective} ({spec.direction})", "",
             f"- method: {spec.method}, pruner: {spec.pruner['kind']}, budget: {spec.trials} trials"
             + (f", {spec.timeout:.0f} s" if spec.timeout else ""),
             "- trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    if best:
        lines += [f"**Best: trial {best['trial']}**, {spec.objective} = {best['objective']:.6g} with "
                  + ", ".join(f"`{k}={v}`" for k, v in best["config"].items()) + ".", "",
                  f"Train it again: `llamaft train {sweep.dir / BEST}` (its run goes to `{sweep.dir / 'best'}`).", ""]
    else:
        lines += ["No trial completed: see the notes in the table.", ""]
    if imp:
        lines += ["Parameter importance: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()), ""]
    lines += ["## Trials (best first)", "", table(rows, spec), "", "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in images]
    return write_text_atomic(sweep.dir / "report.md", "\n".join(lines) + "\n")
