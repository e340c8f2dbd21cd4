"""RUN/report.md + RUN/plots/*.png: one page that says what training did, instead of logs.

    write_report("runs/demo")      # -> runs/demo/report.md

Reads what the run directory already holds (any of it may be missing; the page says so):
- metrics.jsonl   train loss and every `eval/<set>/<metric>` over steps -> line plots + first/last table
- summary.json    model, method, steps, runtime, parameters (and the demo's before/after blocks)
- eval/eval.json  `llamaft eval` results: base vs fine-tuned on the same rows -> bars + table
- eval/predictions*.jsonl   a few rows where the two models answer differently

Plots use matplotlib's object API (no pyplot global state, no GUI backend), so report writing is
safe inside a training process or a server.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Counts and settings: shown in tables, never plotted as if they were scores.
NOT_SCORES = {"samples", "prompts_truncated", "loss_rows_truncated", "loss_rows_dropped"}
TIMING = {"runtime_s", "runtime", "samples_per_second", "steps_per_second"}  # the trainer's eval timings: left out
LOWER_IS_BETTER = {"loss", "perplexity"}
PERCENT_SCALE = {"bleu", "chrf"}  # sacrebleu's 0..100; shown /100 next to the 0..1 metrics in bar plots
EXAMPLES = 5


def write_report(run_dir) -> Path:
    """Write report.md and its plots into `run_dir`; returns the report path."""
    run = Path(run_dir)
    plots = run / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = _read_jsonl(run / "metrics.jsonl")
    summary = _read_json(run / "summary.json") or {}
    ev = _read_json(run / "eval" / "eval.json") or _from_summary(summary)
    series = metric_series(rows)

    md = [f"# Fine-tuning report: {run.name}", ""]
    md += _overview(summary, ev)
    if ev and ev.get("base"):
        md += _before_after(ev, plots)
    md += _training(series, plots)
    md += _eval_sets(series, plots)
    md += _examples(run / "eval")
    md += _notes(ev, series)
    path = run / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Reading


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash must not hide the rest
    return out


def _from_summary(summary: dict) -> dict | None:
    """The demo's summary.json before/after blocks, when eval.json is missing."""
    if summary.get("after"):
        return {"tuned": summary["after"], "base": summary.get("before")}
    return None


def metric_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] for every finite number in metrics.jsonl (the last value per step wins)."""
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        step = row.get("step")
        for key, value in row.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isfinite(value) and step is not None:
                series.setdefault(key, {})[int(step)] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def eval_sets(series: dict) -> dict[str, list[str]]:
    """set -> its metric names, from `eval/<set>/<metric>` keys (timings left out)."""
    sets: dict[str, list[str]] = {}
    for key in series:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] not in TIMING:
            sets.setdefault(parts[1], []).append(parts[2])
    return sets


# ---------------------------------------------------------------------------------------------
# Sections


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _change(metric: str, before, after) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return "–"
    d = after - before
    if metric in NOT_SCORES or d == 0:
        return f"{d:+.4g}" if d else "0"
    better = (d < 0) if metric in LOWER_IS_BETTER else (d > 0)
    return f"{d:+.4g} {'✅' if better else '⚠️'}"


def _overview(summary: dict, ev: dict | None) -> list[str]:
    md = []
    facts = [("model", summary.get("model")), ("method", summary.get("method")), ("steps", summary.get("steps")),
             ("epochs", summary.get("epochs")), ("runtime", f"{summary['runtime_s']:.0f} s" if summary.get("runtime_s") else None),
             ("trainable parameters", f"{summary['trainable_params']:,} of {summary['total_params']:,}"
              if summary.get("trainable_params") and summary.get("total_params") else None),
             ("final train loss", _fmt(summary.get("train_loss")) if summary.get("train_loss") is not None else None)]
    md += [f"- **{k}**: {v}" for k, v in facts if v is not None]
    for line in _headlines(ev):
        md.append(f"- **{line}**")
    return md + [""]


def _headlines(ev: dict | None) -> list[str]:
    """'On <set>, <metric>: 0.1 (base) → 0.9 (fine-tuned)' for the first score of each set."""
    if not ev or not ev.get("base"):
        return []
    out = []
    for name, tuned in ev["tuned"].items():
        base = ev["base"].get(name, {})
        score = next((k for k in tuned if k not in NOT_SCORES | LOWER_IS_BETTER | {"stops_on_eos", "mean_new_tokens"}), None)
        for key in [k for k in (score, "loss") if k and isinstance(tuned.get(k), (int, float)) and isinstance(base.get(k), (int, float))]:
            out.append(f"{name} {key}: {_fmt(base[key])} (base) → {_fmt(tuned[key])} (fine-tuned)")
    return out


def _before_after(ev: dict, plots: Path) -> list[str]:
    md = ["## Before vs after (same rows, base model vs fine-tuned)", ""]
    if _bars(ev, plots / "before_after.png"):
        md += ["![before vs after](plots/before_after.png)", ""]
    md += ["| set | metric | base | fine-tuned | change |", "|---|---|---:|---:|---:|"]
    for name, tuned in ev["tuned"].items():
        base = ev["base"].get(name, {})
        for key, value in tuned.items():
            md.append(f"| {name} | {key} | {_fmt(base.get(key))} | {_fmt(value)} | {_change(key, base.get(key), value)} |")
    return md + [""]


def _training(series: dict, plots: Path) -> list[str]:
    md = ["## Training", ""]
    losses = {k: v for k, v in series.items() if k == "train/loss" or (k.startswith("eval/") and k.endswith("/loss"))}
    if not losses:
        return md + ["No losses in metrics.jsonl (training did not log any).", ""]
    _lines(plots / "loss.png", [("loss", losses)], title="loss over steps")
    md += ["![loss](plots/loss.png)", "", "| series | first | last | change |", "|---|---:|---:|---:|"]
    for key, pts in losses.items():
        md.append(f"| {key} (steps {pts[0][0]}→{pts[-1][0]}) | {_fmt(pts[0][1])} | {_fmt(pts[-1][1])} | {_change('loss', pts[0][1], pts[-1][1])} |")
    return md + [""]


def _eval_sets(series: dict, plots: Path) -> list[str]:
    sets = eval_sets(series)
    if not sets:
        return []
    md = ["## Validation sets over training", ""]
    for name, metrics in sets.items():
        shown = [m for m in metrics if m not in NOT_SCORES]
        panels = [(m, {f"eval/{name}/{m}": series[f"eval/{name}/{m}"]}) for m in shown]
        fname = f"eval_{_safe(name)}.png"
        _lines(plots / fname, panels, title=f"validation set '{name}'")
        md += [f"### {name}", "", f"![{name}](plots/{fname})", "", "| metric | first eval | last eval | change |", "|---|---:|---:|---:|"]
        for m in metrics:
            pts = series[f"eval/{name}/{m}"]
            md.append(f"| {m} | {_fmt(pts[0][1])} (step {pts[0][0]}) | {_fmt(pts[-1][1])} (step {pts[-1][0]}) | {_change(m, pts[0][1], pts[-1][1])} |")
        md.append("")
    return md


def _examples(eval_dir: Path) -> list[str]:
    tuned = _read_jsonl(eval_dir / "predictions.jsonl")
    if not tuned:
        return []
    base = _read_jsonl(eval_dir / "predictions_base.jsonl")
    md = ["## Examples", ""]
    if base and len(base) == len(tuned):
        from .evaluate import differing_rows

        pairs = differing_rows(tuned, base)[:EXAMPLES]
        md += [f"Rows where the base and the fine-tuned model answer differently ({len(pairs)} shown, "
               f"of {sum(t['prediction'] != b['prediction'] for t, b in zip(tuned, base))} of {len(tuned)}).", "",
               "| set | prompt | reference | base | fine-tuned |", "|---|---|---|---|---|"]
        md += [f"| {t.get('set', '')} | {_cell(_prompt_text(t))} | {_cell(t['reference'])} | {_cell(b['prediction'])} | {_cell(t['prediction'])} |"
               for t, b in pairs]
    else:
        md += ["| set | prompt | reference | prediction |", "|---|---|---|---|"]
        md += [f"| {t.get('set', '')} | {_cell(_prompt_text(t))} | {_cell(t['reference'])} | {_cell(t['prediction'])} |" for t in tuned[:EXAMPLES]]
    return md + ["", "All rows with per-row scores: `eval/predictions.jsonl`" + (" and `eval/predictions_base.jsonl`." if base else "."), ""]


def _notes(ev: dict | None, series: dict) -> list[str]:
    md = ["## How to read this", "",
          "- `stops_on_eos`: share of answers that ended on a stop token before `max_new_tokens`; "
          "a fine-tuned model that never stops has not learned where an answer ends.",
          "- `mean_new_tokens`: generated tokens per answer (stop token included).",
          "- Generation metrics during training use a fixed sample of each validation set (`samples`); "
          "`llamaft eval` uses every row unless `--max-samples` is given."]
    truncated = {}
    for name, m in ((ev or {}).get("tuned") or {}).items():
        if m.get("prompts_truncated"):
            truncated[name] = m["prompts_truncated"]
    for key, pts in series.items():
        if key.endswith("/prompts_truncated") and pts and pts[-1][1]:
            truncated[key.split("/")[1]] = int(pts[-1][1])
    for name, n in truncated.items():
        md.append(f"- ⚠️ **{name}**: {n} prompt(s) were longer than `eval.max_prompt_tokens` and were cut from the left.")
    return md + [""]


def _prompt_text(row: dict) -> str:
    users = [m.get("content", "") for m in row.get("prompt") or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def _cell(text, limit: int = 160) -> str:
    """Markdown table cell: one line, pipes escaped, long text cut with an ellipsis."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(n_panels: int, width_per: float = 4.2, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width_per * cols, height * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _lines(path: Path, panels: list[tuple[str, dict]], title: str) -> None:
    """One panel per (ylabel, {series name: [(step, value)]}); a lone point is drawn as a marker."""
    fig, axes = _figure(len(panels), width_per=6.0 if len(panels) == 1 else 4.2)
    for ax, (label, curves) in zip(axes, panels):
        for name, pts in curves.items():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def _bars(ev: dict, path: Path) -> bool:
    """Grouped bars base vs fine-tuned per set, for the 0..1 scores (bleu/chrf shown /100)."""
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
