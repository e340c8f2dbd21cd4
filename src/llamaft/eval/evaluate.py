"""`llamaft eval RUN_DIR [--data FILE] [--compare-base]`: loss + generation metrics of a trained model.

eval's command side (with report.py): it loads a model from a run directory and calls eval's scoring
library (generation.py, metrics.py) and the data pipeline; train never imports it.

    results = evaluate_run("runs/demo", compare_base=True)
    results["tuned"]["capitals_val"]["exact_match"], results["base"]["capitals_val"]["exact_match"]

Which rows: `--data FILE` (read by the data pipeline with the run's columns, format and system prompt),
else the run's test split (rebuilt from config.yaml with the same split seed), else its validation
sets. Every row is evaluated unless `max_samples` is given (then the fixed sample that training used too).

Written to `out` (default RUN/eval):
- predictions.jsonl: one line per row: set, where, prompt (messages), reference, prediction,
  scores (per-row metric values), stopped, n_tokens, prompt_tokens, prompt_truncated.
- predictions_base.jsonl: the same rows answered by the base model (with --compare-base).
- eval.json: {"tuned": {set: metrics}, "base": {set: metrics} | null, ...}.

Loss is token-weighted over the whole set (each batch's mean loss times its trained tokens), so it can
differ slightly from the trainer's eval loss, which averages batch means. Rows are encoded exactly as
training encodes them (`data.pipeline.encode_examples`: template, trained spans, data.max_seq_length
with data.truncation); the rows that policy cut or dropped are counted in `loss_rows_truncated` and
`loss_rows_dropped`. A model directory without a run uses the data section's defaults.
The tuned model is freed before the base model loads: an 8B pair never sits in memory together.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..config import DataConfig, EvalConfig, load_config
from ..data.chat import IGNORE_INDEX
from ..data.collate import Collator
from ..data.pipeline import encode_examples, read_file, split_conversations
from ..errors import LlamaftError
from ..model.inference import load_for_inference, resolve_source
from ..paths import write_text_atomic
from .generation import gen_config_for, generation_metrics, sample_rows
from .metrics import check_metrics, perplexity

EXAMPLES_SHOWN = 3


def evaluate_run(path, data: str | None = None, compare_base: bool = False, out: str | None = None,
                 max_samples: int | None = None, console=None, batch_size: int | None = None) -> dict:
    """Evaluate the model at `path` (run dir, checkpoint dir or merged model dir); returns
    {"tuned": {set: metrics}, "base": {set: metrics} | None, "out": dir, "sets": {set: n_rows}}."""
    console = console or Console()
    src = resolve_source(path)
    cfg = load_config(src.run_dir / "config.yaml", snapshot=True) if src.run_dir is not None else None
    if compare_base and cfg is None:
        raise LlamaftError(f"{path}: --compare-base needs a run directory (its config.yaml names the base model)")
    eval_cfg = cfg.eval if cfg is not None else EvalConfig()
    data_cfg = cfg.data if cfg is not None else DataConfig(train=[str(data or path)])
    sets = _eval_sets(cfg, data_cfg, data, path)
    validation = data is None and "test" not in sets
    plans = {name: _plan(eval_cfg, name, batch_size, use_first=not validation) for name in sets}
    for plan in plans.values():
        check_metrics(plan.metrics, plan.labels)  # before any model loads
    sets = {name: sample_rows(rows, max_samples) for name, rows in sets.items()}
    out_dir = Path(out) if out else (src.run_dir or Path(path)) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    console.print(f"evaluating {path} on " + ", ".join(f"{n} ({len(r)} rows)" for n, r in sets.items()))
    tuned, tuned_rows = _evaluate_loaded(path, True, sets, plans, eval_cfg, data_cfg)
    _write_rows(out_dir / "predictions.jsonl", tuned_rows)
    base = base_rows = None
    if compare_base:
        base, base_rows = _evaluate_loaded(path, False, sets, plans, eval_cfg, data_cfg)
        _write_rows(out_dir / "predictions_base.jsonl", base_rows)

    result = {"tuned": tuned, "base": base, "out": str(out_dir), "sets": {n: len(r) for n, r in sets.items()},
              "model": str(path), "data": data, "max_prompt_tokens": eval_cfg.max_prompt_tokens,
              "generation": {n: p.model_dump() for n, p in plans.items()}}
    write_text_atomic(out_dir / "eval.json", json.dumps(result, indent=2, default=_json_default))
    print_results(console, tuned, base, tuned_rows, base_rows)
    console.print(f"predictions and eval.json written to {out_dir}")
    return result


def _plan(eval_cfg, name: str, batch_size: int | None, use_first: bool):
    """The generation settings for one set (its own, else '*', else defaults), with the CLI's batch size.

    use_first: a test file / test split not named in eval.generation gets the first configured
    entry (the run's task: same metrics and labels as during training).
    """
    plan = gen_config_for(eval_cfg, name, default=True)
    if use_first and name not in eval_cfg.generation and "*" not in eval_cfg.generation and eval_cfg.generation:
        plan = next(iter(eval_cfg.generation.values()))
    return plan.model_copy(update={"batch_size": batch_size}) if batch_size else plan


def _eval_sets(cfg, data_cfg, data: str | None, path) -> dict[str, list]:
    """set name -> conversations: --data, else the test split, else the validation sets."""
    if data:
        convs, fmt = read_file(data, data_cfg, require_assistant=True)  # references are assistant turns
        if fmt == "text":
            raise LlamaftError(f"{data}: plain-text rows have no reference answers; eval needs qa / alpaca / messages rows")
        return {Path(data).stem: convs}
    if cfg is None:
        raise LlamaftError(f"{path}: a model directory has no test split; pass --data FILE")
    splits = split_conversations(cfg.data)
    if splits.test:
        return {"test": splits.test}
    val_sets = {n: rows for n, rows in splits.validation.items() if rows}
    if not val_sets:
        raise LlamaftError(f"{path}: the run has no test split and no validation set; pass --data FILE")
    return val_sets


def _evaluate_loaded(path, adapter: bool, sets: dict, plans: dict, eval_cfg, data_cfg) -> tuple[dict, list[dict]]:
    """Load the model (tuned: with its adapter; base: without), evaluate it, free it."""
    model, tokenizer, rules = load_for_inference(path, adapter=adapter)
    try:
        return _evaluate_model(model, tokenizer, rules, sets, plans, eval_cfg, data_cfg)
    finally:
        del model
        _free()


def _evaluate_model(model, tokenizer, rules, sets: dict, plans: dict, eval_cfg, data_cfg) -> tuple[dict, list[dict]]:
    """{set: metrics} and every row of every set, for one model."""
    metrics_by_set, all_rows = {}, []
    for name, convs in sets.items():
        plan = plans[name]
        examples, stats = encode_examples(convs, tokenizer, rules, data_cfg)
        loss = token_weighted_loss(model, examples, rules.pad_id, plan.batch_size)
        metrics = {"loss": loss, "perplexity": perplexity(loss) if loss is not None else None,
                   "loss_rows_truncated": stats["truncated"], "loss_rows_dropped": sum(stats["dropped"].values())}
        gen, rows = generation_metrics(model, tokenizer, rules, convs, plan, eval_cfg, max_samples=None)
        metrics.update(gen)
        metrics_by_set[name] = metrics
        all_rows += [{"set": name, **row} for row in rows]
    return metrics_by_set, all_rows


@torch.no_grad()
def token_weighted_loss(model, examples: list, pad_id: int, batch_size: int = 8) -> float | None:
    """Mean loss over the trained tokens of encoded examples (None when none has a trained token)."""
    collate = Collator(pad_id)
    device = next(model.parameters()).device
    rows = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model predicts token t+1 from t
        if n == 0:
            continue
        total += float(model(**batch).loss) * n
        tokens += n
    if was_training:
        model.train()
    return total / tokens if tokens else None


def _write_rows(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows))


def _json_default(obj):
    return str(obj)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Terminal output


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def print_results(console, tuned: dict, base: dict | None, tuned_rows: list[dict], base_rows: list[dict] | None) -> None:
    """A metrics table (base | tuned | change when comparing) and a few rows where the answers differ."""
    table = Table(title="evaluation" + (" (base vs fine-tuned, same rows)" if base else ""))
    table.add_column("set")
    table.add_column("metric")
    if base:
        table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    if base:
        table.add_column("change", justify="right")
    for name, metrics in tuned.items():
        for key, value in metrics.items():
            cells = [name, key]
            if base:
                b = base.get(name, {}).get(key)
                delta = value - b if isinstance(value, (int, float)) and isinstance(b, (int, float)) else None
                cells += [_fmt(b), _fmt(value), ("+" if delta and delta > 0 else "") + _fmt(delta) if delta is not None else "-"]
            else:
                cells.append(_fmt(value))
            table.add_row(*cells)
    console.print(table)
    if base_rows:
        for row_t, row_b in differing_rows(tuned_rows, base_rows)[:EXAMPLES_SHOWN]:
            console.rule(f"[dim]{row_t['set']} · {row_t['where']}")
            console.print(f"[bold]prompt:[/] {_last_user(row_t['prompt'])[:300]}", markup=True, highlight=False)
            console.print(f"[bold]reference:[/] {row_t['reference'][:300]}", highlight=False)
            console.print(f"[bold red]base:[/] {row_b['prediction'][:300]}", highlight=False)
            console.print(f"[bold green]fine-tuned:[/] {row_t['prediction'][:300]}", highlight=False)


def differing_rows(tuned_rows: list[dict], base_rows: list[dict]) -> list[tuple[dict, dict]]:
    """Row pairs whose predictions differ: where a score changed first (biggest change), then the rest."""
    pairs = [(t, b) for t, b in zip(tuned_rows, base_rows) if t["prediction"] != b["prediction"]]

    def change(pair):
        t, b = pair
        keys = [k for k, v in t["scores"].items() if isinstance(v, (int, float))]
        return -max((abs(t["scores"][k] - b["scores"].get(k, 0.0)) for k in keys), default=0.0)

    return sorted(pairs, key=change)


def _last_user(messages: list[dict]) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return str(users[-1] if users else (messages[-1].get("content", "") if messages else ""))
