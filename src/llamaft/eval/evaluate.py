"""`llamaft eval RUN_DIR [--data FILE ...] [--compare-base]`: loss + generation metrics of a trained model.

eval's command side (with report.py): it loads a model from a run directory and calls eval's scoring
library (generation.py, metrics.py) and the data pipeline; train never imports it.

    results = evaluate_run("runs/demo", compare_base=True)
    results["tuned"]["bookings_val"]["exact_match"], results["base"]["bookings_val"]["exact_match"]

Which rows: `--data FILE [FILE ...]` (read by the data pipeline with the run's columns, format and
system prompt; each file a set named by its stem), else the run's test file or test split, else its
validation sets or validation split (see run_sets: from the copies train put into RUN/data/, so eval
works from any directory and after the run moved; a missing file is one line naming the original and
--data). Every row is evaluated unless `max_samples` is given (then the fixed sample that training used too).

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
from rich.table import Table

from ..console import make_console
from ..config import DataConfig, EvalConfig, load_config, read_sources
from ..data.chat import IGNORE_INDEX
from ..data.collate import Collator
from ..data.formats import Conversation
from ..data.pipeline import encode_examples, read_file, split_conversations
from ..data.preference import PreferencePair
from ..data.sources import validation_sets
from ..errors import LlamaftError
from ..model.inference import load_for_inference, resolve_source
from ..paths import write_text_atomic
from .generation import gen_config_for, generation_metrics, sample_rows
from .metrics import check_metrics, perplexity
from .preference import pair_logps, pair_metrics, reward_metrics

EXAMPLES_SHOWN = 3


def evaluate_run(path, data: str | list[str] | None = None, compare_base: bool = False, out: str | None = None,
                 max_samples: int | None = None, console=None, batch_size: int | None = None,
                 on_model=None) -> dict:
    """Evaluate the model at `path` (run dir, checkpoint dir or merged model dir); returns
    {"tuned": {set: metrics}, "base": {set: metrics} | None, "out": dir, "sets": {set: n_rows}}.
    data: a file or files to score instead of the run's own sets (each a set named by its stem).
    on_model: called with "tuned" / "base" before that model loads (the demo's stage lines)."""
    on_model = on_model or (lambda which: None)
    console = console or make_console()
    files = [data] if isinstance(data, str) else list(data or [])
    src = resolve_source(path)
    cfg = load_config(src.run_dir / "config.yaml", snapshot=True) if src.run_dir is not None else None
    if compare_base and cfg is None:
        raise LlamaftError(f"{path}: --compare-base needs a run directory (its config.yaml names the base model)")
    eval_cfg = cfg.eval if cfg is not None else EvalConfig()
    data_cfg = cfg.data if cfg is not None else DataConfig(train=[str(files[0] if files else path)])
    sets = _eval_sets(cfg, data_cfg, files, path, src.run_dir)
    validation = not files and "test" not in sets
    plans = {name: _plan(eval_cfg, name, batch_size, use_first=not validation) for name in sets}
    for plan in plans.values():
        check_metrics(plan.metrics, plan.labels)  # before any model loads
    sets = {name: sample_rows(rows, max_samples) for name, rows in sets.items()}
    out_dir = Path(out) if out else (src.run_dir or Path(path)) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    console.print(f"evaluating {path} on " + ", ".join(f"{n} ({len(r)} rows)" for n, r in sets.items()))
    on_model("tuned")
    tuned, tuned_rows = _evaluate_loaded(path, True, sets, plans, eval_cfg, data_cfg)
    _write_rows(out_dir / "predictions.jsonl", tuned_rows)
    base = base_rows = None
    if compare_base:
        on_model("base")
        base, base_rows = _evaluate_loaded(path, False, sets, plans, eval_cfg, data_cfg)
        _write_rows(out_dir / "predictions_base.jsonl", base_rows)

    _rewards(tuned, base, cfg.dpo.beta if base is not None else None)  # --compare-base needs the run's config
    result = {"tuned": tuned, "base": base, "out": str(out_dir), "sets": {n: len(r) for n, r in sets.items()},
              "model": str(path), "data": data, "max_prompt_tokens": eval_cfg.max_prompt_tokens,
              "generation": {n: p.model_dump() for n, p in plans.items()}}
    write_text_atomic(out_dir / "eval.json", json.dumps(result, indent=2, default=_json_default))
    print_results(console, tuned, base, tuned_rows, base_rows)
    console.print(f"predictions and eval.json written to {out_dir}")
    return result


PAIR_LOGPS = "_pair_logps"  # per-pair log-probs, kept until the base model's are known (then dropped)


def _rewards(tuned: dict, base: dict | None, beta: float | None) -> None:
    """Preference sets: with the base evaluated too, the tuned model's DPO reward against it (in `tuned`)."""
    for name, metrics in tuned.items():
        logps = metrics.pop(PAIR_LOGPS, None)
        base_logps = (base or {}).get(name, {}).pop(PAIR_LOGPS, None)
        if logps is not None and base_logps is not None:
            metrics.update(reward_metrics(logps, base_logps, beta))


def _plan(eval_cfg, name: str, batch_size: int | None, use_first: bool):
    """The generation settings for one set (its own, else '*', else defaults), with the CLI's batch size.

    use_first: a test file / test split not named in eval.generation gets the first configured
    entry (the run's task: same metrics and labels as during training).
    """
    plan = gen_config_for(eval_cfg, name, default=True)
    if use_first and name not in eval_cfg.generation and "*" not in eval_cfg.generation and eval_cfg.generation:
        plan = next(iter(eval_cfg.generation.values()))
    return plan.model_copy(update={"batch_size": batch_size}) if batch_size else plan


def _eval_sets(cfg, data_cfg, data: list[str], path, run_dir: Path | None) -> dict[str, list]:
    """set name -> conversations: the --data files, else the run's test split, else its validation sets."""
    if data:
        return {name: _data_file(f, data_cfg) for name, f in _named_files(data).items()}
    if cfg is None:
        raise LlamaftError(f"{path}: a model directory has no test split; pass --data FILE")
    return run_sets(cfg, run_dir, path)


def _named_files(files: list[str]) -> dict[str, str]:
    """--data files by their stems (the set names in the report); two equal stems are an error."""
    named: dict[str, str] = {}
    for f in files:
        name = Path(f).stem
        if name in named:
            raise LlamaftError(f"--data {f}: a second file named '{name}' ({named[name]}); rename one")
        named[name] = f
    return named


def _data_file(f: str, data_cfg) -> list:
    convs, fmt = read_file(f, data_cfg, require_assistant=True)  # references are assistant turns
    if fmt == "text":
        raise LlamaftError(f"{f}: plain-text rows have no reference answers; eval needs qa / alpaca / messages rows")
    return convs


def run_sets(cfg, run_dir: Path, path) -> dict[str, list]:
    """The rows the run holds out, as training held them out: its test file or test split, else its
    validation files or validation split. Since runs travel (train/portable.py) they are read from
    the copies in RUN/data/ (held-out rows exactly as training took them); older runs and sets too
    large to copy are read (and split) where config.yaml names them."""
    d, sources = cfg.data, read_sources(run_dir)
    if d.test:
        return {"test": read_file(_stored(d.test, "data.test", sources, run_dir), d)[0]}
    if d.test_ratio > 0:
        return {"test": _held_out("test", cfg, sources, run_dir)}
    if d.validation is not None:
        for key, p in _validation_paths(d.validation):
            _stored(p, key, sources, run_dir)
        return {name: read_file(p, d)[0] for name, p in validation_sets(d.validation).items()}
    if d.val_ratio > 0:
        return {"validation": _held_out("validation", cfg, sources, run_dir)}
    raise LlamaftError(f"{path}: the run has no test split and no validation set; pass --data FILE")


def _validation_paths(v) -> list[tuple[str, str]]:
    if isinstance(v, str):
        return [("data.validation", v)]
    if isinstance(v, list):
        return [(f"data.validation[{i}]", p) for i, p in enumerate(v)]
    return [(f"data.validation.{name}", p) for name, p in v.items()]


def _held_out(split: str, cfg, sources: dict, run_dir: Path) -> list:
    """The rows val_ratio / test_ratio held out of data.train: RUN/data/split/<split>.jsonl, else
    (older runs, or too large to copy) the same seeded split of data.train taken again."""
    for rel, entry in sources.items():
        if entry.get("split") == split:
            return read_split_rows(_stored(str(run_dir / rel), entry.get("key", "data.train"), sources, run_dir, rel))
    d = cfg.data
    for p in d.train:
        _stored(p, "data.train", sources, run_dir, note=f"the run's {split} split is taken from it again")
    # Only the split asked for: the other sets' files need not exist for it.
    only = d.model_copy(update={"validation": None, "test": None,
                                "val_ratio": d.val_ratio if split == "validation" else 0.0,
                                "test_ratio": d.test_ratio if split == "test" else 0.0})
    splits = split_conversations(only)
    return splits.test if split == "test" else splits.validation["validation"]


def read_split_rows(path: str | Path) -> list[Conversation]:
    """Held-out rows as train/portable.py writes them: one {"where", "messages", "text"?, "tools"?} a line."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            if "rejected" in r:  # a held-out preference pair (train/portable.py)
                rows.append(PreferencePair(r["prompt"], r["chosen"], r["rejected"], r["where"], tools=r.get("tools")))
            else:
                rows.append(Conversation(r["messages"], r["where"], text=r.get("text"), tools=r.get("tools")))
    return rows


def _stored(p: str, key: str, sources: dict, run_dir: Path, rel: str | None = None, note: str = "") -> str:
    """`p` when it exists; else one line naming it, the original it was copied from, and --data."""
    if Path(p).exists():
        return p
    if rel is None:
        try:
            rel = Path(p).resolve().relative_to(Path(run_dir).resolve()).as_posix()
        except ValueError:
            rel = None
    origin = sources.get(rel or "", {}).get("origin")
    if origin:
        why = f"the run's copy of {origin} ({key})"
    else:
        where = "" if Path(p).is_absolute() else ", relative to the directory training ran in"
        why = f"{key} in {Path(run_dir) / 'config.yaml'}{where}" + (f"; {note}" if note else "")
    raise LlamaftError(f"{p}: file not found ({why}); pass --data FILE to evaluate on another file")


def _evaluate_loaded(path, adapter: bool, sets: dict, plans: dict, eval_cfg, data_cfg) -> tuple[dict, list[dict]]:
    """Load the model (tuned: with its adapter merged, as `llamaft merge` would ship it; base: without),
    evaluate it, free it."""
    model, tokenizer, rules = load_for_inference(path, adapter=adapter, merge_adapter=adapter)
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
        if convs and isinstance(convs[0], PreferencePair):  # dpo / orpo / simpo sets: what the model prefers (eval/preference.py)
            logps = pair_logps(model, examples, rules.pad_id, plan.batch_size)
            metrics = {**pair_metrics(logps), PAIR_LOGPS: logps}
        else:
            loss = token_weighted_loss(model, examples, rules.pad_id, plan.batch_size)
            metrics = {"loss": loss, "perplexity": perplexity(loss) if loss is not None else None}
        metrics.update(loss_rows_truncated=stats["truncated"], loss_rows_dropped=sum(stats["dropped"].values()))
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


def fmt_value(value, missing: str = "-") -> str:
    """A metric for people (this table, report.md): 4 significant digits, large values whole with separators."""
    if value is None:
        return missing
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
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
                cells += [fmt_value(b), fmt_value(value), ("+" if delta and delta > 0 else "") + fmt_value(delta) if delta is not None else "-"]
            else:
                cells.append(fmt_value(value))
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
