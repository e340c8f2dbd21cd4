"""Config -> token examples for every split: read, convert, split, encode, apply the length policy.

    from llamaft.data.pipeline import build_datasets, split_conversations
    splits = split_conversations(cfg.data)       # read + split once, before any tokenizer loads
    ds = build_datasets(cfg.data, tokenizer, rules, splits=splits)
    ds.train                      # [Example(input_ids, labels, where)], in file order (the trainer's sampler shuffles)
    ds.validation["validation"]   # named sets, in config order
    ds.stats["train"]             # {"rows", "examples", "truncated", "dropped": {...}, "tokens": {...}, "trained_tokens"}
    splits.validation             # the held-out rows as Conversations (generation metrics reuse them)

Order of work and why:
1. Rows are read and converted (format detected once per file) before any tokenizer runs, so bad
   data fails fast with file:line.
2. The train/validation/test split is taken on *rows*, with `random.Random(split_seed)`, so it does
   not move when the tokenizer, template or max_seq_length change. Held-out rows keep file order.
   No validation split is taken when `data.validation` is given, no test split when `data.test` is.
3. Each conversation is encoded by `llamaft.data.chat.encode` (the only place that knows templates).
4. Length policy: `drop` removes examples longer than max_seq_length (a cut-off answer without its
   end-of-turn token would teach the model to never stop); `truncate` cuts them. An example left with
   no trained token (all labels -100) is dropped too, never trained silently. Every drop is counted.

Files are read and split once per process: training keeps the `Splits` it read before loading the
tokenizer and hands its validation conversations to generation metrics; `llamaft eval` reads a
`--data` file with `read_file` and scores its loss on `encode_examples` (the same policy as training).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ..errors import DataError
from . import chat  # chat.encode is looked up at call time: tests swap it for a 1-id-per-character stand-in
from .chat import IGNORE_INDEX
from .formats import Conversation, detect_format, to_conversation
from .preference import PreferencePair, to_pair
from .sources import read_records, validation_sets

TOO_LONG = "too_long"
NO_TRAINED = "no_trained_tokens"


@dataclass
class Splits:
    """Every split's rows as Conversations, read and split once, before any tokenizer runs."""

    train: list[Conversation]
    validation: dict[str, list[Conversation]]  # named sets, in config order
    test: list[Conversation]
    formats: dict[str, str]  # file -> the format its rows were read as
    key: str | None = None  # data/cache.py's rows key, when read through the cache (tokens are keyed by it)


@dataclass
class Datasets:
    train: list  # list[llamaft.data.chat.Example]
    validation: dict[str, list]  # named sets, in config order
    test: list
    stats: dict = field(default_factory=dict)


def build_datasets(data_cfg, tokenizer, rules, *, splits: Splits | None = None) -> Datasets:
    """Every split as token examples, plus statistics (see the module docstring for the rules).

    `splits`: the result of `split_conversations(data_cfg)` when the caller already has it — read
    the data before loading a tokenizer or model, so bad rows fail in a second, not after a load.
    """
    splits = splits or split_conversations(data_cfg)
    named = validation_sets(data_cfg.validation)
    stats: dict = {"formats": splits.formats, "max_seq_length": data_cfg.max_seq_length, "truncation": data_cfg.truncation}
    train, stats["train"] = encode_examples(splits.train, tokenizer, rules, data_cfg)
    _require_some(train, stats["train"], data_cfg, "data.train", ", ".join(data_cfg.train))
    validation, stats["validation"] = {}, {}
    for name, rows in splits.validation.items():
        validation[name], stats["validation"][name] = encode_examples(rows, tokenizer, rules, data_cfg)
        where = named.get(name, "validation split of data.train")
        _require_some(validation[name], stats["validation"][name], data_cfg, f"validation set '{name}'", where)
    test, stats["test"] = encode_examples(splits.test, tokenizer, rules, data_cfg)
    if data_cfg.test:
        _require_some(test, stats["test"], data_cfg, "data.test", data_cfg.test)
    return Datasets(train, validation, test, stats)


def split_conversations(data_cfg) -> Splits:
    """Read every file and split the rows, before any tokenizer runs.

    Generation-based eval reuses the result, so it evaluates exactly the rows `build_datasets` holds out.
    """
    formats: dict[str, str] = {}
    train_rows = _read_files(data_cfg.train, data_cfg, formats)
    named = validation_sets(data_cfg.validation)
    val_ratio = 0.0 if named else data_cfg.val_ratio
    test_ratio = 0.0 if data_cfg.test else data_cfg.test_ratio
    train_rows, val_rows, test_rows = split_rows(train_rows, val_ratio, test_ratio, data_cfg.split_seed,
                                                 where=f"data.train ({', '.join(map(str, data_cfg.train))})")
    val_sets = {name: _read_files([path], data_cfg, formats) for name, path in named.items()}
    if val_rows:
        val_sets["validation"] = val_rows
    if data_cfg.test:
        test_rows = _read_files([data_cfg.test], data_cfg, formats)
    return Splits(train_rows, val_sets, test_rows, formats)


def read_file(path: str, data_cfg, *, require_assistant: bool | None = None) -> tuple[list[Conversation], str]:
    """One file's rows as Conversations, read with the run's columns, format and system prompt;
    returns (conversations, format). The format is detected per file (files may differ).
    require_assistant: default, only when the loss is on completions (data.train_on)."""
    records = read_records(path)
    fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(records, data_cfg.columns)
    if require_assistant is None:
        require_assistant = data_cfg.train_on == "completion"
    if fmt == "preference":
        return [to_pair(r, data_cfg.columns, data_cfg.system_prompt) for r in records], fmt
    convs = [to_conversation(r, fmt, data_cfg.columns, data_cfg.system_prompt, require_assistant=require_assistant)
             for r in records]
    return convs, fmt


def _read_files(paths: list[str], data_cfg, formats: dict[str, str]) -> list[Conversation]:
    convs = []
    for path in paths:
        rows, formats[str(path)] = read_file(path, data_cfg)
        convs += rows
    return convs


def split_rows(rows: list, val_ratio: float, test_ratio: float, seed: int, where: str = "data.train") -> tuple[list, list, list]:
    """(train, validation, test) by ratio: a seeded shuffle of indices picks the held-out rows; all keep file order.

    A positive ratio holds out at least one row; at least one row always stays for training.
    """
    n = len(rows)
    n_test = _share(n, test_ratio)
    n_val = _share(n, val_ratio)
    if n_val + n_test >= n and (n_val or n_test):
        raise DataError(where, f"only {n} row{'' if n == 1 else 's'}: too few to hold out val_ratio={val_ratio} and test_ratio={test_ratio}; "
                        "add rows, lower the ratios, or give data.validation / data.test files")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_idx = set(order[:n_test])
    val_idx = set(order[n_test:n_test + n_val])
    train = [r for i, r in enumerate(rows) if i not in test_idx and i not in val_idx]
    return train, [rows[i] for i in sorted(val_idx)], [rows[i] for i in sorted(test_idx)]


def _share(n: int, ratio: float) -> int:
    return 0 if ratio <= 0 or n == 0 else max(1, round(n * ratio))


def encode_examples(convs: list[Conversation], tokenizer, rules, data_cfg) -> tuple[list, dict]:
    """Encode conversations and apply the length policy: (kept examples, stats of what was cut or dropped).
    Preference pairs become chat.PreferenceExamples under the same policy (`_encode_pairs`)."""
    if convs and isinstance(convs[0], PreferencePair):
        return _encode_pairs(convs, tokenizer, rules, data_cfg)
    max_len = data_cfg.max_seq_length
    kept, truncated = [], 0
    dropped = {TOO_LONG: 0, NO_TRAINED: 0}
    dropped_where: dict[str, list[str]] = {TOO_LONG: [], NO_TRAINED: []}
    longest = 0
    for conv in convs:
        ex = chat.encode(conv, tokenizer, rules, train_on=data_cfg.train_on, assistant_turns=data_cfg.assistant_turns)
        if len(ex.input_ids) != len(ex.labels):
            raise AssertionError(f"{ex.where}: encode returned {len(ex.input_ids)} ids but {len(ex.labels)} labels")
        longest = max(longest, len(ex.input_ids))
        reason = None
        if len(ex.input_ids) > max_len:
            if data_cfg.truncation == "drop":
                reason = TOO_LONG
            else:
                ex.input_ids, ex.labels = ex.input_ids[:max_len], ex.labels[:max_len]
                truncated += 1
        if reason is None and all(label == IGNORE_INDEX for label in ex.labels):
            reason = NO_TRAINED
        if reason:
            dropped[reason] += 1
            if len(dropped_where[reason]) < 5:  # a few examples so the user can look them up
                dropped_where[reason].append(ex.where)
            continue
        kept.append(ex)
    stats = {
        "rows": len(convs),
        "examples": len(kept),
        "truncated": truncated,
        "dropped": dropped,
        "dropped_where": dropped_where,
        "longest_row": longest,
        "tokens": length_stats([len(e.input_ids) for e in kept]),
        "trained_tokens": sum(sum(1 for label in e.labels if label != IGNORE_INDEX) for e in kept),
    }
    return kept, stats


def _encode_pairs(pairs: list[PreferencePair], tokenizer, rules, data_cfg) -> tuple[list, dict]:
    """Pairs as PreferenceExamples. A pair's length is its prompt + its longer answer (each side is one
    sequence): over max_seq_length it is dropped, or with truncation=truncate its answers are cut to fit
    (a prompt that fills max_seq_length alone leaves nothing to compare: dropped)."""
    max_len = data_cfg.max_seq_length
    kept, truncated, longest = [], 0, 0
    dropped, dropped_where = {TOO_LONG: 0, NO_TRAINED: 0}, {TOO_LONG: [], NO_TRAINED: []}
    for pair in pairs:
        ex = chat.encode_pair(pair, tokenizer, rules)
        room = max_len - len(ex.prompt_ids)
        longest = max(longest, len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids)))
        if max(len(ex.chosen_ids), len(ex.rejected_ids)) > room:
            if data_cfg.truncation == "drop" or room <= 0:
                dropped[TOO_LONG] += 1
                dropped_where[TOO_LONG] += [ex.where] if len(dropped_where[TOO_LONG]) < 5 else []
                continue
            ex.chosen_ids, ex.rejected_ids = ex.chosen_ids[:room], ex.rejected_ids[:room]
            truncated += 1
        kept.append(ex)
    lengths = [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in kept]
    stats = {"rows": len(pairs), "examples": len(kept), "truncated": truncated, "dropped": dropped,
             "dropped_where": dropped_where, "longest_row": longest, "tokens": length_stats(lengths),
             "trained_tokens": sum(len(e.chosen_ids) + len(e.rejected_ids) for e in kept)}
    return kept, stats


def length_stats(lengths: list[int]) -> dict:
    """min / mean / p95 (nearest rank) / max / total of token lengths; zeros when empty."""
    if not lengths:
        return {"min": 0, "mean": 0.0, "p95": 0, "max": 0, "total": 0}
    s = sorted(lengths)
    return {"min": s[0], "mean": round(sum(s) / len(s), 1), "p95": s[math.ceil(0.95 * len(s)) - 1], "max": s[-1], "total": sum(s)}


def _require_some(examples: list, stats: dict, data_cfg, what: str, where: str) -> None:
    """An empty split is an error that says why every row went, never an empty training run."""
    if examples:
        return
    n, long_, none = stats["rows"], stats["dropped"][TOO_LONG], stats["dropped"][NO_TRAINED]
    max_len = data_cfg.max_seq_length
    if long_ == n:
        msg = (f"all {n} rows of {what} are longer than max_seq_length={max_len} (longest: {stats['longest_row']} tokens); "
               "raise data.max_seq_length or use data.truncation=truncate")
    elif none == n:
        hint = "the cut removed every answer; raise data.max_seq_length" if stats["truncated"] else "check the assistant turns, or use data.train_on=all"
        msg = f"all {n} rows of {what} have no trained tokens (every label is -100); {hint}"
    else:
        msg = (f"all {n} rows of {what} were dropped ({long_} longer than max_seq_length={max_len}, {none} with no trained tokens); "
               "raise data.max_seq_length or use data.truncation=truncate")
    raise DataError(where, msg)
