"""RUN/report.md + RUN/plots/*.png: one page that says what training did, instead of logs.

eval's command side (with evaluate.py): it reads files a run left behind and calls nothing of train.

    write_report("runs/demo")      # -> runs/demo/report.md

`llamaft train` writes it at the end of every run (completed, stopped or interrupted); the demo and
`llamaft eval` users rewrite it once eval/eval.json exists.

Reads what the run directory already holds (any of it may be missing; the page says so):
- metrics.jsonl   train loss, tokens/s, memory and every `eval/<set>/<metric>` over steps -> line
                  plots + first/last tables
- summary.json    status, model, method, steps, runtime, parameters, `throughput`, the last evaluation
                  during training with `eval_during_training` (how many rows each number stands for),
                  and the demo's before/after blocks
- eval/eval.json  `llamaft eval` results (every row): base vs fine-tuned on the same rows -> bars + table
- eval/predictions*.jsonl   a few rows where the two models answer differently
- loss.png        the run's loss plot (training draws it): copied to plots/, not drawn twice

Plots come from eval/plots.py (matplotlib's object API: safe inside a training process or a server);
a tiny run's page with its plots takes about a second on CPU.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..paths import write_text_atomic
from .evaluate import differing_rows, fmt_value
from .plots import LOWER_IS_BETTER, NOT_SCORES, before_after_bars, line_panels, plot_losses, set_panels

TIMING = {"runtime_s", "runtime", "samples_per_second", "steps_per_second"}  # the trainer's eval timings: left out
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

    scope = (summary.get("eval_during_training") or {}).get("sets", {})
    md = [f"# Fine-tuning report: {run.name}", ""]
    md += _overview(summary, ev)
    if ev and ev.get("base"):
        md += _before_after(ev, plots)
    md += _training(rows, series, plots, run / "loss.png")
    md += _throughput(summary.get("throughput"), series, plots)
    md += _last_eval(summary.get("eval"), scope)
    md += _eval_sets(series, plots, scope)
    md += _examples(run / "eval")
    md += _notes(ev, series)
    return write_text_atomic(run / "report.md", "\n".join(md) + "\n")


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
    return fmt_value(v, missing="–")


def _change(metric: str, before, after) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return "–"
    d = after - before
    if metric in NOT_SCORES or d == 0:
        return f"{d:+.4g}" if d else "0"
    better = (d < 0) if metric in LOWER_IS_BETTER else (d > 0)
    return f"{d:+.4g} {'✅' if better else '⚠️'}"


def _overview(summary: dict, ev: dict | None) -> list[str]:
    """The summary table (the facts summary.json holds), then one headline per set of eval.json."""
    t = summary.get("throughput") or {}
    facts = [("status", summary.get("status")), ("model", summary.get("model")), ("method", summary.get("method")),
             ("steps", summary.get("steps")), ("epochs", _fmt(summary["epochs"]) if summary.get("epochs") is not None else None),
             ("runtime", f"{summary['runtime_s']:.0f} s" if summary.get("runtime_s") else None),
             ("trainable parameters", f"{summary['trainable_params']:,} of {summary['total_params']:,}"
              if summary.get("trainable_params") and summary.get("total_params") else None),
             ("final train loss", _fmt(summary.get("train_loss")) if summary.get("train_loss") is not None else None),
             ("throughput", _rate(t) if t.get("tokens_per_s") is not None else None),
             ("memory peak", f"{t['memory_peak_gib']:.2f} GiB on {t.get('device')}" if t.get("memory_peak_gib") else None),
             ("precision", summary.get("precision"))]
    md = ["| run | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts if v is not None] + [""]
    headlines = [f"- **{line}**" for line in _headlines(ev)]
    return md + (headlines + [""] if headlines else [])


def _rate(t: dict) -> str:
    return f"{t['tokens_per_s']:,.0f} tokens/s, {t['step_time_s']:.3g} s/step (mean)"


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
    if before_after_bars(ev, plots / "before_after.png"):
        md += ["![before vs after](plots/before_after.png)", ""]
    md += ["| set | metric | base | fine-tuned | change |", "|---|---|---:|---:|---:|"]
    for name, tuned in ev["tuned"].items():
        base = ev["base"].get(name, {})
        for key, value in tuned.items():
            md.append(f"| {name} | {key} | {_fmt(base.get(key))} | {_fmt(value)} | {_change(key, base.get(key), value)} |")
    return md + [""]


def _training(rows: list[dict], series: dict, plots: Path, loss_png: Path) -> list[str]:
    md = ["## Training", ""]
    losses = {k: v for k, v in series.items() if k == "train/loss" or (k.startswith("eval/") and k.endswith("/loss"))}
    if not losses:
        return md + ["No losses in metrics.jsonl (training did not log any).", ""]
    if loss_png.is_file():  # training drew it from the same metrics.jsonl
        shutil.copyfile(loss_png, plots / "loss.png")
    else:
        set_names = [k.split("/")[1] for k in losses if k.startswith("eval/")]
        plot_losses(rows, set_names, plots / "loss.png", title="loss over steps")
    md += ["![loss](plots/loss.png)", "", "| series | first | last | change |", "|---|---:|---:|---:|"]
    for key, pts in losses.items():
        md.append(f"| {key} (steps {pts[0][0]}→{pts[-1][0]}) | {_fmt(pts[0][1])} | {_fmt(pts[-1][1])} | {_change('loss', pts[0][1], pts[-1][1])} |")
    return md + [""]


def _throughput(t: dict | None, series: dict, plots: Path) -> list[str]:
    """summary.json's `throughput` block as a table, tokens/s and memory over steps as a plot."""
    if not t:
        return []
    md = ["## Throughput", ""]
    panels = [(label, {key: series[key]}) for key, label in (("train/tokens_per_s", "tokens/s"),
                                                             ("train/mem_peak_gib", "memory peak (GiB)")) if series.get(key)]
    if panels:
        line_panels(plots / "throughput.png", panels, title="each point: the steps since the previous log", from_zero=True)
        md += ["![throughput](plots/throughput.png)", ""]
    facts = [("tokens/s", _rate(t) if t.get("tokens_per_s") is not None else "no step finished"),
             ("train tokens", f"{t['train_tokens']:,} in {t['steps']} steps ({t['train_time_s']:.1f} s of steps, "
                              f"{t['wall_time_s']:.1f} s with evaluation and checkpoints)"),
             ("device", t.get("device")),
             ("memory peak", f"{t['memory_peak_gib']:.2f} GiB: {t.get('memory_measured')}"),
             ("CUDA max allocated", f"{t['cuda_max_allocated_gib']:.2f} GiB (torch.cuda.max_memory_allocated, this "
                                    "process's tensors)" if t.get("cuda_max_allocated_gib") is not None else None),
             ("tokens counted", t.get("tokens_counted"))]
    md += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts if v is not None]
    return md + [""]


def _last_eval(final: dict | None, scope: dict) -> list[str]:
    """summary.json's `eval`: each set at the last evaluation during training, with what it was computed on."""
    if not final:
        return []
    md = ["## Last evaluation during training", "",
          "Generation metrics here come from a fixed sample of each set (the same rows at every evaluation); "
          "`llamaft eval` scores every row: RUN/eval/eval.json and, with a base model, the before/after section.", "",
          "| set | loss | perplexity | generation metrics | computed on |", "|---|---:|---:|---|---|"]
    for name, m in final.items():
        gen = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k not in {"loss", "perplexity"} | NOT_SCORES)
        on = (scope.get(name) or {}).get("note", f"{m['samples']} rows" if m.get("samples") else "")
        md.append(f"| {name} | {_fmt(m.get('loss'))} | {_fmt(m.get('perplexity'))} | {gen or '–'} | {on} |")
    return md + [""]


def _eval_sets(series: dict, plots: Path, scope: dict) -> list[str]:
    sets = eval_sets(series)
    if not sets:
        return []
    md = ["## Validation sets over training", ""]
    for name, metrics in sets.items():
        md += [f"### {name}", ""]
        if (scope.get(name) or {}).get("note"):
            md += [f"{scope[name]['rows']} rows; {scope[name]['note']}.", ""]
        panels = set_panels(name, metrics, series)
        if [label for label, _ in panels] == ["loss"]:  # the loss plot above has it already: no figure to wait for
            md += ["Its loss is in the loss plot above.", ""]
        else:
            fname = f"eval_{_safe(name)}.png"
            line_panels(plots / fname, panels, title=f"validation set '{name}'")
            md += [f"![{name}](plots/{fname})", ""]
        md += ["| metric | first eval | last eval | change |", "|---|---:|---:|---:|"]
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
          "- Generation metrics during training use a fixed sample of each validation set (`samples`, the same "
          "rows at every evaluation; summary.json's `eval_during_training` says how many of how many); "
          "`llamaft eval` uses every row unless `--max-samples` is given (RUN/eval/eval.json)."]
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
