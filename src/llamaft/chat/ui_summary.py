"""The web UI's run panel: what a run directory says about itself, as Markdown.

    run_summary_markdown(Path("runs/demo"))   # method, base model, data, final losses, metrics

Reads RUN/config.yaml and RUN/summary.json as plain YAML/JSON rather than through the typed config:
a panel that only shows facts must never refuse to open an older (or newer) run over a schema change.
No gradio import here, so it is tested without a browser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict:
    """A dict from a YAML/JSON file, or {} when missing or unreadable (the panel says what it lacks)."""
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - OSError, JSON or YAML errors: a broken file must not take the UI down
        return {"__error__": f"{path.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"}
    return data if isinstance(data, dict) else {}


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return _cell(str(v))


def _cell(text: str) -> str:
    # Table cells: a "|" or newline in a file name or prompt would break the Markdown table.
    return text.replace("|", "\\|").replace("\n", " ")


def _numbers(d: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to {"a/b": number} keeping only numeric leaves (metric blocks)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_numbers(v, f"{prefix}{k}/" if isinstance(v, dict) else f"{prefix}{k}"))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix] = d
    return out


def _metrics_table(summary: dict) -> list[str]:
    """Before/after per set and metric when the run was evaluated with --compare-base (the demo
    does); else the final validation losses."""
    before, after = summary.get("before"), summary.get("after")
    if isinstance(after, dict) and after:
        b, a = _numbers(before or {}), _numbers(after)
        rows = ["| set / metric | base (before) | fine-tuned (after) |", "|---|---|---|"]
        rows += [f"| {_cell(k)} | {_fmt(b.get(k))} | {_fmt(v)} |" for k, v in a.items()]
        return rows
    ev = _numbers(summary.get("eval") or {})
    if ev:
        return ["| validation set / metric | value |", "|---|---|"] + [f"| {_cell(k)} | {_fmt(v)} |" for k, v in ev.items()]
    return []


def run_summary_markdown(run_dir: Path | None) -> str:
    """Markdown for the run panel, in one piece."""
    return "\n\n".join(p for p in run_summary_parts(run_dir) if p)


def run_summary_parts(run_dir: Path | None) -> tuple[str, str]:
    """(facts, metrics) Markdown for the run panel's two columns; an explanation when there is no run."""
    if run_dir is None:
        return "_No run directory: this is a plain model, so there is no training summary to show._", ""
    cfg, summary = _load(run_dir / "config.yaml"), _load(run_dir / "summary.json")
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    lora, train = cfg.get("lora") or {}, cfg.get("train") or {}
    method = summary.get("method") or model.get("method") or "?"
    lines = [f"**Run** `{run_dir}`", ""]
    facts = [("method", method), ("base model", summary.get("model") or model.get("name"))]
    if method in ("lora", "qlora"):
        facts.append(("LoRA", f"r={lora.get('r', '?')}, alpha={lora.get('alpha', '?')}"))
    train_files = data.get("train") or []
    facts.append(("training data", ", ".join(map(str, train_files if isinstance(train_files, list) else [train_files])) or None))
    facts.append(("format", data.get("format")))
    stats = (summary.get("data") or {}).get("train") or {}
    if isinstance(stats, dict) and "examples" in stats:
        facts.append(("training examples", stats["examples"]))
    validation = data.get("validation")
    if isinstance(validation, dict):
        facts.append(("validation sets", ", ".join(validation)))
    elif validation:
        facts.append(("validation", validation))
    facts.append(("system prompt", data.get("system_prompt")))
    facts += [("steps", summary.get("steps")), ("epochs", summary.get("epochs")),
              ("learning rate", train.get("learning_rate")), ("precision", summary.get("precision")),
              ("final train loss", summary.get("train_loss")), ("runtime (s)", summary.get("runtime_s"))]
    lines += ["| run | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in facts if v not in (None, "")]
    for name, d in (("config.yaml", cfg), ("summary.json", summary)):
        if "__error__" in d:
            lines += ["", f"_could not read {_cell(d['__error__'])}_"]
        elif not d:
            lines += ["", f"_no {name} in this run (training unfinished?)_"]
    table = _metrics_table(summary)
    return "\n".join(lines), "\n".join(["**Metrics**", "", *table]) if table else ""
