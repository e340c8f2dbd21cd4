"""Every plot of a run directory: RUN/loss.png (written by training) and the report's plots/*.png.

    plot_losses(read_metrics("runs/demo/metrics.jsonl"), ["validation"], "runs/demo/loss.png")

`plot_losses` is the one loss plot: the train loss and each named validation set's loss against the
optimizer step. Steps whose loss was NaN/Inf (metrics.jsonl marks them under "nonfinite") are drawn
as red crosses at the top edge with a dotted red line: a diverged run must not look like a loss of 0
or a gap. `line_panels` (with `set_panels` for a validation set) and `before_after_bars` draw the
report's other figures.

matplotlib's object API only (no pyplot global state, no GUI backend): safe inside a training
process, a server or several threads.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Counts and settings: shown in tables, never plotted as if they were scores.
NOT_SCORES = {"samples", "prompts_truncated", "loss_rows_truncated", "loss_rows_dropped"}
LOWER_IS_BETTER = {"loss", "perplexity"}
PERCENT_SCALE = {"bleu", "chrf"}  # sacrebleu's 0..100; shown /100 next to the 0..1 metrics in bar plots


def nonfinite_steps(rows: list[dict], key: str = "train/loss") -> list[int]:
    return [r["step"] for r in rows if key in (r.get("nonfinite") or {})]


def plot_losses(rows: list[dict], set_names: list[str], out: str | Path, title: str = "") -> Path | None:
    """Draw from metrics.jsonl rows; None when nothing was logged."""
    # A non-finite (null) loss stays in the series as NaN: the line breaks there instead of bridging it.
    train = [(r["step"], r["train/loss"] if r["train/loss"] is not None else math.nan) for r in rows if "train/loss" in r]
    has_train = any(math.isfinite(v) for _, v in train)
    curves = {n: [(r["step"], r[f"eval/{n}/loss"]) for r in rows if r.get(f"eval/{n}/loss") is not None] for n in set_names}
    bad = nonfinite_steps(rows)
    if not has_train and not any(curves.values()) and not bad:
        return None
    fig, (ax,) = _figure(1, width_per=7, height=4.5, dpi=110)
    if has_train:
        ax.plot(*zip(*train), label="train", linewidth=1.2, alpha=0.85)
    for name, pts in curves.items():
        if pts:
            # markers: evaluations are sparse, a lone point must still be visible
            ax.plot(*zip(*pts), marker="o", markersize=4, label=f"eval/{name}")
    if bad:
        _mark_nonfinite(ax, bad)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    return out


def _mark_nonfinite(ax, steps: list[int]) -> None:
    """Red x at the top of the axes (no finite y to put them at) + a dotted line at each step."""
    top = ax.get_ylim()[1]
    for s in steps:
        ax.axvline(s, color="red", linestyle=":", linewidth=0.8, alpha=0.6)
    ax.plot(steps, [top] * len(steps), "x", color="red", markersize=8, clip_on=False, label="train loss NaN/Inf")
    ax.set_ylim(top=top)


def _figure(n_panels: int, width_per: float = 4.2, height: float = 3.2, dpi: int = 100):
    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width_per * cols, height * rows), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def line_panels(path: Path, panels: list[tuple[str, dict]], title: str, from_zero: bool = False) -> None:
    """One panel per (ylabel, {series name: [(step, value)]}); a lone point is drawn as a marker.
    from_zero: y axes start at 0 (rates, memory: a 0.2% wobble must not fill the panel)."""
    fig, axes = _figure(len(panels), width_per=6.0 if len(panels) == 1 else 4.2)
    for ax, (label, curves) in zip(axes, panels):
        for name, pts in curves.items():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no tick at 1.5
        ax.set_ylabel(label)
        if from_zero:
            top = max((v for pts in curves.values() for _, v in pts), default=0.0)
            ax.set_ylim(0, top * 1.1 or 1.0)  # headroom: the line must not sit on the frame
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def set_panels(set_name: str, metrics: list[str], series: dict) -> list[tuple[str, dict]]:
    """A validation set's panels for `line_panels`: its loss; every score within 0..1 together (bleu
    and chrf /100), so a set with five metrics is one figure of two panels, not five; any other
    metric alone. Perplexity (exp of the loss) and counts are left to the report's table."""
    pts = lambda m: series[f"eval/{set_name}/{m}"]
    panels = [("loss", {"loss": pts("loss")})] if "loss" in metrics else []
    scores = {}
    for m in metrics:
        if m in NOT_SCORES or m in LOWER_IS_BETTER:
            continue
        scale = 100.0 if m in PERCENT_SCALE else 1.0
        scaled = [(step, v / scale) for step, v in pts(m)]
        if all(0.0 <= v <= 1.0 for _, v in scaled):
            scores[m + ("/100" if scale != 1.0 else "")] = scaled
        else:
            panels.append((m, {m: scaled}))
    if scores:
        panels.insert(1 if panels and panels[0][0] == "loss" else 0, ("score (0..1)", scores))
    return panels or [(m, {m: pts(m)}) for m in metrics[:1]]  # only counts: still one panel, never an empty figure


def before_after_bars(ev: dict, path: Path) -> bool:
    """Grouped bars base vs fine-tuned per set, for the 0..1 scores (bleu/chrf shown /100); False: none."""
    sets = []
    for name, tuned in ev["tuned"].items():
        base = ev["base"].get(name, {})
        keys = [k for k, v in tuned.items() if k not in NOT_SCORES | LOWER_IS_BETTER | {"mean_new_tokens"}
                and isinstance(v, (int, float)) and isinstance(base.get(k), (int, float))]
        if keys:
            sets.append((name, keys, base, tuned))
    if not sets:
        return False
    fig, axes = _figure(len(sets), width_per=max(4.5, 1.2 * max(len(k) for _, k, _, _ in sets)), height=3.6)
    for ax, (name, keys, base, tuned) in zip(axes, sets):
        scale = [100.0 if k in PERCENT_SCALE else 1.0 for k in keys]
        xs = list(range(len(keys)))
        b = [base[k] / s for k, s in zip(keys, scale)]
        t = [tuned[k] / s for k, s in zip(keys, scale)]
        ax.bar([x - 0.2 for x in xs], b, width=0.4, label="base", color="#bbbbbb")
        ax.bar([x + 0.2 for x in xs], t, width=0.4, label="fine-tuned", color="#2a9d8f")
        for x, v in zip(xs, t):
            ax.annotate(f"{v:.2f}", (x + 0.2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, [k + ("/100" if s != 1 else "") for k, s in zip(keys, scale)], rotation=20, fontsize=8)
        ax.set_ylim(0, max(1.0, max(b + t) * 1.1))
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.suptitle("before vs after")
    fig.tight_layout()
    fig.savefig(path)
    return True
