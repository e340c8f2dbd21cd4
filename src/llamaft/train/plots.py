"""loss.png: the train loss and each named validation set's loss against the optimizer step.

Steps whose loss was NaN/Inf (metrics.jsonl marks them under "nonfinite") are drawn as red crosses
at the top edge with a dotted red line: a diverged run must not look like a loss of 0 or a gap.
"""

from __future__ import annotations

import math
from pathlib import Path


def nonfinite_steps(rows: list[dict], key: str = "train/loss") -> list[int]:
    return [r["step"] for r in rows if key in (r.get("nonfinite") or {})]


def plot_losses(rows: list[dict], set_names: list[str], out: str | Path, title: str = "") -> Path | None:
    """Draw from metrics.jsonl rows; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    # A non-finite (null) loss stays in the series as NaN: the line breaks there instead of bridging it.
    train = [(r["step"], r["train/loss"] if r["train/loss"] is not None else math.nan) for r in rows if "train/loss" in r]
    has_train = any(math.isfinite(v) for _, v in train)
    curves = {n: [(r["step"], r[f"eval/{n}/loss"]) for r in rows if r.get(f"eval/{n}/loss") is not None] for n in set_names}
    bad = nonfinite_steps(rows)
    if not has_train and not any(curves.values()) and not bad:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
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
    plt.close(fig)
    return out


def _mark_nonfinite(ax, steps: list[int]) -> None:
    """Red x at the top of the axes (no finite y to put them at) + a dotted line at each step."""
    top = ax.get_ylim()[1]
    for s in steps:
        ax.axvline(s, color="red", linestyle=":", linewidth=0.8, alpha=0.6)
    ax.plot(steps, [top] * len(steps), "x", color="red", markersize=8, clip_on=False, label="train loss NaN/Inf")
    ax.set_ylim(top=top)
