"""`llamaft eval RUN_DIR [--data FILE] [--compare-base]`: loss + generation metrics of a trained model.

    results = evaluate_run("runs/demo", compare_base=True)
    results["tuned"]["capitals_val"]["exact_match"], results["base"]["capitals_val"]["exact_match"]

Which rows: `--data FILE` (read with the run's column names and system prompt), else the run's test
split (rebuilt from config.yaml with the same split seed), else its validation sets. Every row is
evaluated unless `max_samples` is given (then the fixed sample that training used too).

Written to `out` (default RUN/eval):
- predictions.jsonl: one line per row: set, where, prompt (messages), reference, prediction,
  scores (per-row metric values), stopped, n_tokens, prompt_tokens, prompt_truncated.
- predictions_base.jsonl: the same rows answered by the base model (with --compare-base).
- eval.json: {"tuned": {set: metrics}, "base": {set: metrics} | null, ...}.

Loss here is token-weighted over the whole set (each batch's mean loss times its trained tokens),
so it can differ slightly from the trainer's eval loss, which averages batch means.
The tuned model is freed before the base model loads: an 8B pair never sits in memory together.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import torch

from ..data.chat import IGNORE_INDEX
from ..errors import LlamaftError
from .generation import gen_config_for, generation_metrics, load_conversations, sample_rows
from .metrics import check_metrics, perplexity

EXAMPLES_SHOWN = 3


def evaluate_run(path, data: str | None = None, compare_base: bool = False, out: str | None = None,
                 max_samples: int | None = None, console=None, batch_size: int | None = None) -> dict:
    """Evaluate the model at `path` (run dir, checkpoint dir or merged model dir); returns
    {"tuned": {set: metrics}, "base": {set: metrics} | None, "out": dir, "sets": {set: n_rows}}."""
    from rich.console import Console

    from ..config import EvalConfig, load_config
    from ..model.inference import load_for_inference, resolve_source

    console = console or Console()
    src = resolve_source(path)
    cfg = load_config(src.run_dir / "config.yaml", snapshot=True) if src.run_dir is not None else None
    if compare_base and cfg is None:
        raise LlamaftError(f"{path}: --compare-base needs a run directory (its config.yaml names the base model)")
    eval_cfg = cfg.eval if cfg is not None else EvalConfig()
    sets = _eval_sets(cfg, data, path)
    validation = data is None and "test" not in sets
    plans = {name: _plan(eval_cfg, name, batch_size, use_first=not validation) for name in sets}
    for plan in plans.values():
        check_metrics(plan.metrics, plan.labels)  # before any model loads
    sets = {name: sample_rows(rows, max_samples) for name, rows in sets.items()}
    out_dir = Path(out) if out else (src.run_dir or Path(path)) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    console.print(f"evaluating {path} on " + ", ".join(f"{n} ({len(r)} rows)" for n, r in sets.items()))
    model, tokenizer, rules = load_for_inference(path, adapter=True)
    tuned, tuned_rows = _evaluate_model(model, tokenizer, rules, sets, plans, eval_cfg, cfg)
    _write_rows(out_dir / "predictions.jsonl", tuned_rows)
    base = base_rows = None
    if compare_base:
        del model
        _free()
        model, tokenizer, rules = load_for_inference(path, adapter=False)
        base, base_rows = _evaluate_model(model, tokenizer, rules, sets, plans, eval_cfg, cfg)
        _write_rows(out_dir / "predictions_base.jsonl", base_rows)
    del model
    _free()

    result = {"tuned": tuned, "base": base, "out": str(out_dir), "sets": {n: len(r) for n, r in sets.items()},
              "model": str(path), "data": data, "max_prompt_tokens": eval_cfg.max_prompt_tokens,
              "generation": {n: p.model_dump() for n, p in plans.items()}}
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, default=_json_default), encoding="utf-8")
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


def _eval_sets(cfg, data: str | None, path) -> dict[str, list]:
    """set name -> conversations: --data, else the test split, else the validation sets."""
    if data:
        return {Path(data).stem: read_conversations(data, cfg.data if cfg is not None else None)}
    if cfg is None:
        raise LlamaftError(f"{path}: a model directory has no test split; pass --data FILE")
    val_sets, test = load_conversations(cfg.data)
    if test:
        return {"test": test}
    val_sets = {n: rows for n, rows in val_sets.items() if rows}
    if not val_sets:
        raise LlamaftError(f"{path}: the run has no test split and no validation set; pass --data FILE")
    return val_sets


def read_conversations(path: str, data_cfg=None) -> list:
    """A data file as conversations, read with the run's columns/format/system prompt when there is a run."""
    from ..config import ColumnsConfig
    from ..data.formats import detect_format, to_conversation
    from ..data.sources import read_records

    records = read_records(path)
    columns = data_cfg.columns if data_cfg is not None else ColumnsConfig()
    fmt = data_cfg.format if data_cfg is not None and data_cfg.format != "auto" else detect_format(records, columns)
    if fmt == "text":
        raise LlamaftError(f"{path}: plain-text rows have no reference answers; eval needs qa / alpaca / messages rows")
    system = data_cfg.system_prompt if data_cfg is not None else None
    return [to_conversation(r, fmt, columns, system) for r in records]


def _evaluate_model(model, tokenizer, rules, sets: dict, plans: dict, eval_cfg, cfg) -> tuple[dict, list[dict]]:
    """{set: metrics} and every row of every set, for one model."""
    metrics_by_set, all_rows = {}, []
    for name, convs in sets.items():
        plan = plans[name]
        loss = set_loss(model, tokenizer, rules, convs, cfg, plan.batch_size)
        metrics = {"loss": loss["loss"], "perplexity": perplexity(loss["loss"]) if loss["loss"] is not None else None,
                   "loss_rows_truncated": loss["truncated"]}
        gen, rows = generation_metrics(model, tokenizer, rules, convs, plan, eval_cfg, max_samples=None)
        metrics.update(gen)
        metrics_by_set[name] = metrics
        all_rows += [{"set": name, **row} for row in rows]
    return metrics_by_set, all_rows


@torch.no_grad()
def set_loss(model, tokenizer, rules, convs: list, cfg, batch_size: int = 8) -> dict:
    """Token-weighted mean loss over the trained tokens of the conversations (as training encodes them).

    Examples longer than data.max_seq_length are cut to it for the forward pass and counted.
    """
    from ..data.chat import encode
    from ..data.collate import Collator

    train_on = cfg.data.train_on if cfg is not None else "completion"
    turns = cfg.data.assistant_turns if cfg is not None else "all"
    max_len = cfg.data.max_seq_length if cfg is not None else 2048
    examples, truncated = [], 0
    for conv in convs:
        ex = encode(conv, tokenizer, rules, train_on=train_on, assistant_turns=turns)
        if len(ex.input_ids) > max_len:
            ex.input_ids, ex.labels = ex.input_ids[:max_len], ex.labels[:max_len]
            truncated += 1
        examples.append({"input_ids": ex.input_ids, "labels": ex.labels})
    collate = Collator(rules.pad_id)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model predicts token t+1 from t
        if n == 0:
            continue
        loss = model(**batch).loss
        total += float(loss) * n
        tokens += n
    if was_training:
        model.train()
    return {"loss": total / tokens if tokens else None, "tokens": tokens, "truncated": truncated}


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    tmp.replace(path)


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
    from rich.table import Table

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
