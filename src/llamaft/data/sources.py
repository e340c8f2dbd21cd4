"""Read data files into raw rows, each tagged with where it came from.

    from llamaft.data.sources import read_records
    rows = read_records("data/train.jsonl")      # [Record(data={...}, where="data/train.jsonl:line 1"), ...]

Supported inputs and how a row is located (all 1-based, so the user can open the file and look):

- ``.jsonl`` / ``.ndjson``: one JSON object per line; ``where = "path:line N"`` (the physical line;
  blank lines are skipped but still counted).
- ``.json``: a JSON array of objects, or ``{"data": [...]}``; ``where = "path:row N"`` (N-th element).
  A ``.json`` file that actually holds JSON lines (common in recipe repositories) is read as JSON lines.
- ``.csv`` / ``.tsv``: the first line is the header; ``where = "path:row N"`` counts *data* rows
  (the header is not a row), which differs from the physical line when a quoted cell spans lines.
  Every cell stays a string (no number guessing); empty cells become ``""``.
- ``.parquet``: via pyarrow; ``where = "path:row N"``.
- a directory written by ``datasets.save_to_disk``: a ``Dataset``, or a ``DatasetDict`` with exactly
  one split. A ``DatasetDict`` with several splits is an error that names them and asks for the
  split's subdirectory (``dir/train``) — silently picking one would train on the wrong rows.

Every user-fixable problem raises `DataError` with one line naming the file and line/row.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

JSONL_EXT = {".jsonl", ".ndjson"}
SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet, or a datasets.save_to_disk directory"


@dataclass
class Record:
    """One raw row: column -> value, and where it came from ("path:line N" / "path:row N")."""

    data: dict
    where: str


def read_records(path: str) -> list[Record]:
    """All rows of one data file (or save_to_disk directory); never empty (empty input is a DataError)."""
    p = Path(path)
    if p.is_dir():
        records = _read_saved_dataset(p)
    elif not p.exists():
        raise DataError(str(path), "file not found")
    else:
        ext = p.suffix.lower()
        if ext in JSONL_EXT:
            records = _read_jsonl(p, _read_text(p))
        elif ext == ".json":
            records = _read_json(p, _read_text(p))
        elif ext in (".csv", ".tsv"):
            records = _read_csv(p, _read_text(p), "\t" if ext == ".tsv" else ",")
        elif ext == ".parquet":
            records = _read_parquet(p)
        else:
            raise DataError(str(path), f"unsupported file type '{p.suffix or '(none)'}' (expected {SUPPORTED})")
    if not records:
        raise DataError(str(path), "no rows (the file is empty)")
    return records


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    try:
        # utf-8-sig: tolerate the byte-order mark that Excel and Notepad write.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{p}:line {line}", f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); re-save the file as UTF-8") from None


def _read_jsonl(p: Path, text: str) -> list[Record]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(where, f"malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(where, f"expected a JSON object per line, got {_kind(obj)}")
        records.append(Record(obj, where))
    return records


def _read_json(p: Path, text: str) -> list[Record]:
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if _looks_like_jsonl(text):
            return _read_jsonl(p, text)
        raise DataError(f"{p}:line {err.lineno}", f"malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    elif isinstance(obj, dict):
        # One object is one row only by accident (a one-line JSON-lines file, or a lone record):
        # reading it as a dataset of one row fails later with a message that names no file.
        raise DataError(str(p), "a .json file must hold a list of rows (a JSON array of objects, or "
                        '{"data": [...]}), not a single object; wrap it in [...] or use .jsonl for one object per line')
    if not isinstance(obj, list):
        raise DataError(str(p), f'expected a JSON array of objects or {{"data": [...]}}, got {_kind(obj)}')
    records = []
    for n, row in enumerate(obj, 1):
        if not isinstance(row, dict):
            raise DataError(f"{p}:row {n}", f"expected a JSON object, got {_kind(row)}")
        records.append(Record(row, f"{p}:row {n}"))
    return records


def _looks_like_jsonl(text: str) -> bool:
    """The first non-blank line is a whole JSON object on its own."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _read_csv(p: Path, text: str, delimiter: str) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    last_line = len(text.splitlines())
    try:
        header = next(reader, None)
        if header is None:
            return []
        if len(set(header)) != len(header) or any(not h.strip() for h in header):
            raise DataError(f"{p}:line 1", f"the header needs unique, non-empty column names (got {header})")
        records = []
        for n, cells in enumerate(reader, 1):
            if reader.line_num == last_line and _unclosed_quote(text, delimiter):
                # csv (non-strict) lets an unclosed quote swallow the rest of the file into one cell
                raise DataError(f"{p}:line {_unclosed_quote(text, delimiter)}",
                                "a quoted cell is never closed (it runs to the end of the file); add the closing \"")
            if not any(c.strip() for c in cells):
                continue  # blank line
            if len(cells) > len(header):
                raise DataError(f"{p}:row {n}", f"{len(cells)} cells but the header has {len(header)} columns")
            cells = cells + [""] * (len(header) - len(cells))
            records.append(Record(dict(zip(header, cells)), f"{p}:row {n}"))
    except csv.Error as err:
        opened = _unclosed_quote(text, delimiter)
        if opened:
            raise DataError(f"{p}:line {opened}", "a quoted cell is never closed (it runs to the end of the file); "
                            'add the closing "') from None
        raise DataError(f"{p}:line {reader.line_num}", f"malformed CSV ({err})") from None
    return records


def _unclosed_quote(text: str, delimiter: str) -> int | None:
    """The line where a quoted cell opens and never closes, read the way the csv module reads quotes
    (a quote opens a cell only at its start; "" inside is an escaped quote); None when all close."""
    in_quote, at_start, line, opened = False, True, 1, None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if in_quote:
            if c == '"':
                if i + 1 < n and text[i + 1] == '"':
                    i += 1
                else:
                    in_quote = False
        elif c == '"' and at_start:
            in_quote, opened = True, line
        if c == "\n":
            line += 1
        at_start = not in_quote and c in (delimiter, "\n", "\r")
        i += 1
    return opened if in_quote else None


def _read_parquet(p: Path) -> list[Record]:
    import pyarrow.parquet as pq  # heavy; only for .parquet files

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(str(p), f"cannot read Parquet file ({type(err).__name__}: {err})".splitlines()[0]) from None
    return [Record(row, f"{p}:row {n}") for n, row in enumerate(rows, 1)]


def _read_saved_dataset(p: Path) -> list[Record]:
    if not any((p / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(str(p), f"a directory, but not one written by datasets.save_to_disk (expected {SUPPORTED})")
    from datasets import DatasetDict, load_from_disk  # heavy (seconds); only for save_to_disk directories

    try:
        ds = load_from_disk(str(p))
    except Exception as err:
        raise DataError(str(p), f"cannot load saved dataset ({type(err).__name__}: {err})".splitlines()[0]) from None
    if isinstance(ds, DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise DataError(str(p), f"a DatasetDict with splits {', '.join(splits)}; point at one split's directory, e.g. {p / splits[0]}")
        ds = ds[splits[0]]
    return [Record(dict(row), f"{p}:row {n}") for n, row in enumerate(ds, 1)]


def _kind(obj) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")


def validation_sets(spec) -> dict[str, str]:
    """Named validation files from `data.validation`, in config order.

    None -> {}; a file -> {"validation": file}; a mapping -> as given (each file must exist);
    a list of files -> each named by its file stem (``data/relevance_val.jsonl`` -> ``relevance_val``);
    a directory -> every ``*val.json`` / ``*val.jsonl`` in sorted order, named by the file stem.
    Two files that would get the same name are an error naming both (never "the last one wins").
    """
    if spec is None:
        return {}
    if isinstance(spec, dict):
        for name, path in spec.items():
            if not str(name).strip():
                raise DataError("data.validation", "a validation set needs a non-empty name")
            if not Path(path).exists():
                raise DataError(str(path), f"validation file not found (data.validation.{name})")
        return {str(k): str(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        for path in spec:
            if not Path(path).exists():
                raise DataError(str(path), "validation file not found (data.validation)")
        return _named_by_stem([Path(f) for f in spec])
    p = Path(spec)
    if p.is_dir() and not (p / "dataset_info.json").exists() and not (p / "dataset_dict.json").exists():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(("val.json", "val.jsonl")))
        if not files:
            raise DataError(str(p), "no validation files in this directory (expected names ending in val.json or val.jsonl, e.g. relevance_val.jsonl)")
        return _named_by_stem(files)
    if not p.exists():
        raise DataError(str(p), "validation file or directory not found (data.validation)")
    return {"validation": str(p)}


def _named_by_stem(files: list[Path]) -> dict[str, str]:
    sets: dict[str, str] = {}
    for f in files:
        name = f.stem if f.suffix else f.name  # a save_to_disk directory keeps its whole name
        if name in sets:
            raise DataError(str(f), f"two validation sets named '{name}' ({sets[name]} and {f}); rename one, "
                            "or give data.validation as a mapping name: file")
        sets[name] = str(f)
    return sets
