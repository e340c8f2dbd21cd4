"""`llamaft data CONFIG.yaml [--show N] [--dump FILE.jsonl]`: show exactly what will be trained.

    from llamaft.config import load_config
    from llamaft.data.inspect import inspect_data
    from llamaft.model.tokenizer import load_tokenizer
    inspect_data(load_config("configs/llama-3.1-8b-lora.yaml"), load_tokenizer, show=2, dump="/tmp/train.jsonl")

Prints a few rendered training examples with the loss-bearing spans highlighted, a table of token
lengths per split, and what was truncated or dropped (and where). `dump` writes one line per
training example, ``{"input_ids": [...], "labels": [...]}``, in the trainer's order (a preference pair:
``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` and each side's ``input_ids`` + ``labels``). The dump path is
checked before the tokenizer loads (not a directory, its folder writable); the file is written to a
temporary sibling and renamed, so a crash or a full disk never leaves a half-written dump.
"""

from __future__ import annotations

import json

from rich import box
from rich.panel import Panel
from rich.table import Table

from ..console import make_console
from ..paths import check_output_file, clean_stale, publish_file, remove, tmp_file, write_errors
from . import chat  # chat.render_trained looked up at call time, like pipeline's chat.encode (tests swap both)
from .chat import IGNORE_INDEX
from .pipeline import NO_TRAINED, TOO_LONG, Datasets, build_datasets, split_conversations


def inspect_data(cfg, load_tokenizer, show: int = 3, dump: str | None = None, console=None) -> dict:
    """Build every split as the trainer would, print it, optionally dump train; returns the stats (+ "dump").
    `load_tokenizer(model_cfg, data_cfg) -> (tokenizer, rules)` comes from the caller (the model layer's
    loader for the CLI): data never imports the layer above it, and it is called only after the rows
    were read and checked."""
    console = console or make_console()
    if dump:
        dump = str(check_output_file(dump, "--dump", example="train.jsonl"))
    splits = split_conversations(cfg.data)  # bad rows fail here, before the (slow) tokenizer load
    tokenizer, rules = load_tokenizer(cfg.model, cfg.data)
    ds = build_datasets(cfg.data, tokenizer, rules, splits=splits)
    _print_examples(ds, tokenizer, show, console)
    console.print(stats_table(ds.stats))
    _print_drops(ds.stats, console)
    result = dict(ds.stats)
    if dump:
        result["dump"] = write_dump(ds.train, dump)
        console.print(f"wrote {len(ds.train)} training examples to {result['dump']}")
    return result


def _print_examples(ds: Datasets, tokenizer, show: int, console) -> None:
    files = ", ".join(f"{path} ({fmt})" for path, fmt in ds.stats["formats"].items())
    console.print(f"[bold]data:[/bold] {files}")
    if show <= 0:
        return
    # Styles match chat.render_trained: trained spans bold green, the rest dim.
    console.print("[bold]legend:[/bold] [bold green]bold green[/bold green] = trained (has loss); "
                  "[dim]dim[/dim] = context only (label -100); special tokens are shown as text")
    for ex in ds.train[:show]:
        # a preference pair shows both sides: prompt + chosen, prompt + rejected, each completion trained
        sides = [(f"{name} — ", ex.side(name)) for name in ("chosen", "rejected")] if hasattr(ex, "side") else [("", ex)]
        for label, side in sides:
            trained = sum(1 for t in side.labels if t != IGNORE_INDEX)
            title = f"{side.where} — {label}{len(side.input_ids)} tokens, {trained} trained"
            console.print(Panel(chat.render_trained(side, tokenizer), title=title, title_align="left"))


def _splits(stats: dict, with_empty_test: bool) -> list[tuple[str, dict]]:
    named = [(n if n == "validation" else f"val:{n}", s) for n, s in stats["validation"].items()]
    test = [("test", stats["test"])] if with_empty_test or stats["test"]["rows"] else []
    return [("train", stats["train"])] + named + test


def stats_table(stats: dict):
    """A rich Table: one line per split with rows, kept examples, drops and token lengths."""
    table = Table(title=f"tokens per example (max_seq_length={stats['max_seq_length']}, truncation={stats['truncation']})",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    rows = _splits(stats, with_empty_test=False)
    table.add_column("split", no_wrap=True, min_width=max(len(name) for name, _ in rows))
    for col in ("rows", "kept", "cut", "dropped", "min", "mean", "p95", "max", "trained"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, s in rows:
        t = s["tokens"]
        cells = (s["rows"], s["examples"], s["truncated"], sum(s["dropped"].values()), t["min"], f"{t['mean']:.1f}", t["p95"],
                 t["max"], s["trained_tokens"])
        table.add_row(name, *map(str, cells))
    table.caption = "kept: examples trained/evaluated; cut: truncated; dropped: reasons below; trained: tokens with loss"
    return table


def _print_drops(stats: dict, console) -> None:
    labels = {TOO_LONG: "longer than max_seq_length", NO_TRAINED: "no trained tokens"}
    for name, s in _splits(stats, with_empty_test=True):
        for reason, wheres in s["dropped_where"].items():
            if wheres:
                more = "" if s["dropped"][reason] <= len(wheres) else f" (+{s['dropped'][reason] - len(wheres)} more)"
                console.print(f"[yellow]{name}: dropped {s['dropped'][reason]} ({labels[reason]}):[/yellow] {', '.join(wheres)}{more}")


def dump_row(ex) -> dict:
    """An SFT example: input_ids + labels. A preference pair: TRL's prompt_ids / chosen_ids / rejected_ids,
    and each side as the sequence the model sees (input_ids + labels, -100 on the prompt)."""
    if not hasattr(ex, "side"):
        return {"input_ids": list(ex.input_ids), "labels": list(ex.labels)}
    row = {"where": ex.where, "prompt_ids": list(ex.prompt_ids), "chosen_ids": list(ex.chosen_ids),
           "rejected_ids": list(ex.rejected_ids)}
    for name in ("chosen", "rejected"):
        side = ex.side(name)
        row[name] = {"input_ids": side.input_ids, "labels": side.labels}
    return row


def write_dump(examples: list, path: str) -> str:
    """One JSON line per example, in order, written atomically (temp file in the same directory + os.replace)."""
    target = check_output_file(path, "--dump", example="train.jsonl")
    clean_stale(target)
    tmp = tmp_file(target)
    with write_errors(target, "--dump", cleanup=(tmp,)):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                for ex in examples:
                    f.write(json.dumps(dump_row(ex)) + "\n")
        except BaseException:
            remove(tmp)
            raise
    publish_file(tmp, target, "--dump")
    return str(target)
