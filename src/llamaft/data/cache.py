"""A content-keyed cache of read and tokenized data, shared by the runs of a sweep (llamaft/sweep/).

    splits = cached_splits(cfg.data, cache_dir)                        # rows read, validated, split
    data = cached_datasets(cfg.data, tokenizer, rules, splits, cache_dir)  # token examples + stats

`cache_dir=None` is the plain path (`split_conversations` / `build_datasets`), so the recipe calls
these alike with or without a cache.

What a key holds, and why (caches keyed by a path or an mtime hand out stale tokens after a file is
edited in place, or a template is changed):
- rows: the bytes of every data file (train, validation, test; a directory: each file in it), the
  whole `data` section except the file names (format, columns, system prompt, ratios, seed, the
  length policy...), the chat template file's bytes, and the source of the modules that read and
  encode rows (a new llamaft that encodes differently never reads an old entry);
- tokens: the rows' key plus the tokenizer's full serialization (vocabulary, merges, normalizer,
  added tokens), its chat template, and every field of the TokenRules (pad id, template variables...).
A tokenizer that cannot be serialized (no fast backend) is not cached: it is encoded every time.

Format: no pickles. Rows are JSON (the Conversations as dicts); token examples are one safetensors
file of flat int32 arrays with offsets, and a JSON file for `where` and the stats. Each entry is
written into a staging directory and renamed into place in one step: a reader (another worker of the
same sweep) sees a whole entry or none, and two writers of the same key both write the same thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from ..paths import remove, tmp_dir
from . import chat, formats, pipeline, preference, sources
from .chat import Example
from .formats import Conversation
from .sources import validation_sets

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout of an entry changes
_ROWS, _EXAMPLES, _META = "rows.json", "examples.safetensors", "meta.json"


# ---------------------------------------------------------------------------------------------
# keys


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _hash_path(h, path: str | Path) -> None:
    """A file's bytes, or a directory's files (relative name + bytes, in sorted order)."""
    p = Path(path)
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            _hash_file(h, f)
    else:
        _hash_file(h, p)


def rows_key(data_cfg) -> str:
    """Key of the rows `split_conversations(data_cfg)` returns (see the module docstring)."""
    h = hashlib.sha256(f"llamaft-data-cache {FORMAT}\n".encode())
    for module in (pipeline, formats, sources, chat, preference):
        h.update(Path(module.__file__).read_bytes())
    settings = data_cfg.model_dump(mode="json")
    for name in ("train", "validation", "test", "chat_template"):
        settings.pop(name, None)
    h.update(json.dumps(settings, sort_keys=True).encode())
    files = [("train", p) for p in data_cfg.train]
    files += [(f"validation:{n}", p) for n, p in validation_sets(data_cfg.validation).items()]
    files += [("test", data_cfg.test)] if data_cfg.test else []
    files += [("chat_template", data_cfg.chat_template)] if data_cfg.chat_template else []
    for role, path in files:
        h.update(f"\n{role}\n".encode())
        _hash_path(h, path)
    return h.hexdigest()[:32]


def tokens_key(rows: str, tokenizer, rules) -> str | None:
    """Key of the token examples: the rows' key + the tokenizer and its rules (None: not cacheable)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(rows.encode())
    h.update(backend.to_str().encode())
    h.update(json.dumps({"class": type(tokenizer).__name__, "template": getattr(tokenizer, "chat_template", None),
                         "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                         "added": sorted(map(str, tokenizer.get_added_vocab().items())),
                         "rules": dataclasses.asdict(rules) if dataclasses.is_dataclass(rules) else repr(vars(rules))},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# the cached steps


def cached_splits(data_cfg, cache_dir: str | Path | None) -> pipeline.Splits:
    """`split_conversations(data_cfg)`, read from / written to `cache_dir` when given."""
    if cache_dir is None:
        return pipeline.split_conversations(data_cfg)
    key = rows_key(data_cfg)  # once, before reading: tokens are keyed by the files as they were read
    entry = Path(cache_dir) / f"rows-{key}"
    if (entry / _ROWS).is_file():
        return _splits_from_json(json.loads((entry / _ROWS).read_text(encoding="utf-8")), key)
    splits = pipeline.split_conversations(data_cfg)
    splits.key = key
    if not _conversations_only(splits):
        return splits
    try:
        rows = json.dumps(_splits_to_json(splits)).encode()
    except (TypeError, ValueError) as err:  # a value JSON cannot hold (e.g. from parquet): read again next time
        log.info("rows of %s not cached: %s", data_cfg.train, err)
        return splits
    _publish(entry, {_ROWS: rows})
    return splits


def cached_datasets(data_cfg, tokenizer, rules, splits: pipeline.Splits, cache_dir: str | Path | None) -> pipeline.Datasets:
    """`build_datasets(data_cfg, tokenizer, rules, splits=splits)`, read from / written to `cache_dir`
    (keyed by the rows key cached_splits gave `splits`: the files are not hashed a second time)."""
    cacheable = cache_dir is not None and splits.key is not None and _conversations_only(splits)
    key = tokens_key(splits.key, tokenizer, rules) if cacheable else None
    if key is None:
        return pipeline.build_datasets(data_cfg, tokenizer, rules, splits=splits)
    entry = Path(cache_dir) / f"tokens-{key}"
    if (entry / _META).is_file():
        return _datasets_from(entry)
    data = pipeline.build_datasets(data_cfg, tokenizer, rules, splits=splits)
    _publish(entry, _datasets_files(data))
    return data


def _conversations_only(splits: pipeline.Splits) -> bool:
    """Preference pairs (train.objective dpo / orpo / simpo) are not cached yet: their rows and three-part
    examples have no entry format here, so every run reads and encodes them itself."""
    rows = [*splits.train, *splits.test, *(r for v in splits.validation.values() for r in v)]
    if all(isinstance(r, Conversation) for r in rows):
        return True
    log.info("preference rows are not cached: each run reads and encodes them")
    return False


def _publish(entry: Path, files: dict[str, bytes]) -> None:
    """Write `files` into a staging directory and rename it to `entry` (a concurrent writer of the
    same key may win: its entry is the same, ours is dropped). A cache that cannot be written only
    costs the next run the work again."""
    staging = tmp_dir(entry)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (staging / name).write_bytes(content)
        os.rename(staging, entry)
    except OSError as err:
        if not entry.is_dir():
            log.warning("data cache %s not written: %s", entry, err)
    finally:
        remove(staging)


# ---------------------------------------------------------------------------------------------
# (de)serialization: JSON and safetensors, never pickle


def _conv_to_dict(c: Conversation) -> dict:
    return {"messages": c.messages, "where": c.where, "text": c.text, "tools": c.tools}


def _splits_to_json(s: pipeline.Splits) -> dict:
    return {"train": [_conv_to_dict(c) for c in s.train], "test": [_conv_to_dict(c) for c in s.test],
            "validation": [[n, [_conv_to_dict(c) for c in rows]] for n, rows in s.validation.items()],
            "formats": s.formats}


def _splits_from_json(d: dict, key: str) -> pipeline.Splits:
    convs = lambda rows: [Conversation(**r) for r in rows]  # noqa: E731
    return pipeline.Splits(convs(d["train"]), {n: convs(rows) for n, rows in d["validation"]}, convs(d["test"]),
                           d["formats"], key)


def _datasets_files(data: pipeline.Datasets) -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    parts = {"train": data.train, "test": data.test, **{f"v{i}": exs for i, exs in enumerate(data.validation.values())}}
    tensors, where = {}, {}
    for part, exs in parts.items():
        offsets = [0]
        for ex in exs:
            offsets.append(offsets[-1] + len(ex.input_ids))
        tensors[f"{part}.input_ids"] = torch.tensor([i for ex in exs for i in ex.input_ids], dtype=torch.int32)
        tensors[f"{part}.labels"] = torch.tensor([i for ex in exs for i in ex.labels], dtype=torch.int32)
        tensors[f"{part}.offsets"] = torch.tensor(offsets, dtype=torch.int64)
        where[part] = [ex.where for ex in exs]
    meta = {"validation": list(data.validation), "where": where, "stats": data.stats}
    return {_EXAMPLES: save(tensors), _META: json.dumps(meta).encode()}


def _datasets_from(entry: Path) -> pipeline.Datasets:
    from safetensors.torch import load_file

    meta = json.loads((entry / _META).read_text(encoding="utf-8"))
    tensors = load_file(entry / _EXAMPLES)

    def part(name: str) -> list[Example]:
        ids, labels = tensors[f"{name}.input_ids"].tolist(), tensors[f"{name}.labels"].tolist()
        off = tensors[f"{name}.offsets"].tolist()
        return [Example(ids[a:b], labels[a:b], w) for a, b, w in zip(off, off[1:], meta["where"][name])]

    validation = {n: part(f"v{i}") for i, n in enumerate(meta["validation"])}
    return pipeline.Datasets(part("train"), validation, part("test"), meta["stats"])
