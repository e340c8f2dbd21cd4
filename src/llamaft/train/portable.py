"""A run directory that travels: its config.yaml names every file by a path that holds from any
working directory, and after the run is moved or copied to another machine.

    save_run_config(run.cfg, run.dir, run.splits)     # train/recipe.py, when the run starts writing

What config.yaml stores (load_config(..., snapshot=True) reads it back, see config/load.py):
- data.train: absolute paths (the working directory of training resolved them, as always);
- what `llamaft eval` scores, copied into RUN/data/ while it is small (COPY_BUDGET in all) and stored
  relative to the run (`data/alpha.jsonl`): the rows val_ratio / test_ratio held out of data.train
  (RUN/data/split/validation.jsonl, test.jsonl: the exact rows, so eval never needs the training
  file again), the validation files (of a directory: its *val.json(l) files) and the test file.
  What does not fit stays an absolute path;
- data.chat_template: always copied (every later load of the run rebuilds its tokenizer with it);
- model.name / model.tokenizer: a local path absolute; the embedded demo model's cache directory as
  `embedded:smollm2` (each machine resolves it to its own cache); a hub id as it is.
RUN/data/sources.json (config.RUN_SOURCES) records each copy's origin, so that an error about a
missing copy names the original file.

A held-out row is one JSON line: {"where", "messages", "text"?, "tools"?} (a preference pair:
{"where", "prompt", "chosen", "rejected", "tools"?}) — the Conversation that
training held out, with `where` naming the training file absolutely ("/abs/train.jsonl:line 7");
eval/evaluate.py's read_split_rows reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..assets import DEMO_MODEL_DIRNAME, EMBEDDED_SMOLLM2, cache_dir
from ..config import RUN_SOURCES, read_sources, save_config
from ..paths import clean_stale, publish_dir, remove, tmp_dir, write_errors

COPY_BUDGET = 50 * 2**20  # bytes of eval data copied into a run; larger sets stay where they are
DATA = "data"
SPLIT_DIR = "split"  # RUN/data/split/<validation|test>.jsonl: rows held out of data.train


@dataclass
class Copy:
    """One thing placed into RUN/data/."""

    key: str                    # the config key it stands for: data.test, data.validation.alpha, data.train
    origin: str                 # the absolute path the config named (held-out rows: the training files)
    name: str                   # its path inside RUN/data/
    source: Path | None = None  # the file or directory copied; None for held-out rows
    text: str | None = None     # held-out rows, as JSON lines
    split: str | None = None    # "validation" / "test" for held-out rows
    rows: int | None = None

    @property
    def rel(self) -> str:
        return f"{DATA}/{self.name}"


def save_run_config(cfg, run_dir: str | Path, splits) -> None:
    """RUN/data/ (copies + sources.json), then RUN/config.yaml naming them: see the module docstring."""
    run_dir = Path(run_dir)
    data_dir = run_dir / DATA
    if data_dir.exists() and not (run_dir / RUN_SOURCES).is_file():
        # output_dir is a folder with a data/ of the user's own: never replace it.
        print(f"note: {data_dir} is not llamaft's; config.yaml names the run's data files by absolute paths")
        copies = []
    else:
        copies = plan_copies(cfg, run_dir, splits)
        if copies:
            write_run_data(run_dir, copies)
    save_config(portable_config(cfg, {c.key: c.rel for c in copies if c.split is None}), run_dir / "config.yaml")


# ---------------------------------------------------------------------------------------------
# What goes into RUN/data/


def plan_copies(cfg, run_dir: Path, splits, budget: int | None = None) -> list[Copy]:
    """Held-out rows first (without them eval would need the whole training file), then validation
    files, the test file, while they fit in `budget` (default COPY_BUDGET); the chat template always."""
    d, known = cfg.data, read_sources(run_dir)
    budget = COPY_BUDGET if budget is None else budget
    taken = {"sources.json", SPLIT_DIR}
    wanted = _held_out(cfg, splits)
    for key, path, keep in _eval_files(d):
        name = _place(Path(path).name, taken, keep)
        if name is not None:
            wanted.append(Copy(key, _origin(path, run_dir, known), name, source=Path(path)))
    chosen, used = [], 0
    for c in wanted:
        size = len(c.text.encode("utf-8")) if c.text is not None else _size(c.source)
        if used + size <= budget:
            chosen.append(c)
            used += size
    if d.chat_template:
        name = _place(Path(d.chat_template).name, taken, keep=False)
        chosen.append(Copy("data.chat_template", _origin(d.chat_template, run_dir, known), name, source=Path(d.chat_template)))
    return chosen


def _held_out(cfg, splits) -> list[Copy]:
    """The rows val_ratio / test_ratio took out of data.train, as split files."""
    d = cfg.data
    files = [_absolute(p) for p in d.train]
    parts = []
    if d.validation is None and splits.validation.get("validation"):
        parts.append(("validation", splits.validation["validation"]))
    if d.test is None and splits.test:
        parts.append(("test", splits.test))
    out = []
    for split, rows in parts:
        text = _rows_text(rows, d.train)
        if text is not None:  # a value JSON cannot hold: eval rebuilds the split from data.train instead
            out.append(Copy("data.train", ", ".join(files), f"{SPLIT_DIR}/{split}.jsonl", text=text, split=split, rows=len(rows)))
    return out


def _rows_text(rows, train_files: list[str]) -> str | None:
    lines = []
    for conv in rows:
        row = {"where": _absolute_where(conv.where, train_files)}
        if hasattr(conv, "rejected"):  # a preference pair (data/preference.py): its three parts, not only chosen
            row.update(prompt=conv.prompt, chosen=conv.chosen, rejected=conv.rejected)
        else:
            row["messages"] = conv.messages
        if conv.text is not None:
            row["text"] = conv.text
        if conv.tools is not None:
            row["tools"] = conv.tools
        try:
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        except (TypeError, ValueError):
            return None
    return "".join(lines)


def _absolute_where(where: str, train_files: list[str]) -> str:
    """'data/train.jsonl:line 7' -> '/abs/data/train.jsonl:line 7': findable from any directory."""
    for f in train_files:
        if where.startswith(f"{f}:"):
            return _absolute(f) + where[len(f):]
    return where


def _eval_files(d) -> list[tuple[str, str, bool]]:
    """(config key, path, keep its name) of each validation file and the test file. Files of a
    validation list keep their names: the set names are their stems."""
    v = d.validation
    found = []
    if isinstance(v, str):
        found.append(("data.validation", v, False))
    elif isinstance(v, list):
        found += [(f"data.validation[{i}]", p, True) for i, p in enumerate(v)]
    elif isinstance(v, dict):
        found += [(f"data.validation.{name}", p, False) for name, p in v.items()]
    if d.test:
        found.append(("data.test", d.test, False))
    return [(k, p, keep) for k, p, keep in found if Path(p).exists()]


def _place(name: str, taken: set[str], keep: bool) -> str | None:
    """A free name in RUN/data/ (`alpha-2.jsonl` when `alpha.jsonl` is taken); None when `keep` and taken."""
    candidate, i = name, 1
    while candidate in taken:
        if keep:
            return None
        i += 1
        p = Path(name)
        candidate = f"{p.stem}-{i}{p.suffix}" if p.suffix else f"{name}-{i}"
    taken.add(candidate)
    return candidate


def _origin(path: str, run_dir: Path, known: dict[str, dict]) -> str:
    """Where a file came from: a resumed run's own copy keeps the origin its manifest recorded."""
    full = Path(_absolute(path))
    try:
        rel = full.relative_to(Path(_absolute(run_dir))).as_posix()
    except ValueError:
        return str(full)
    return str(known.get(rel, {}).get("origin") or full)


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in _dir_files(p))
    return p.stat().st_size


def _dir_files(p: Path) -> list[Path]:
    """A validation directory's *val.json(l) files; a save_to_disk dataset: every file."""
    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
        return [f for f in p.rglob("*") if f.is_file()]
    return [f for f in p.iterdir() if f.is_file() and f.name.endswith(("val.json", "val.jsonl"))]


def write_run_data(run_dir: Path, copies: list[Copy]) -> Path:
    """RUN/data/ written beside itself and renamed into place: never half-written (a full disk is one
    line naming it), and a resumed run's earlier copies are replaced only by complete new ones."""
    out = run_dir / DATA
    clean_stale(out)
    tmp = tmp_dir(out)
    remove(tmp)
    with write_errors(out, cleanup=(tmp,)):
        tmp.mkdir(parents=True)
        for c in copies:
            _write_copy(c, tmp / c.name)
        manifest = {c.rel: {"origin": c.origin, "key": c.key, **({"split": c.split, "rows": c.rows} if c.split else {})}
                    for c in copies}
        (tmp / "sources.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return publish_dir(tmp, out)


def _write_copy(c: Copy, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if c.text is not None:
        dest.write_text(c.text, encoding="utf-8")
    elif c.source.is_dir():
        dest.mkdir()
        for f in _dir_files(c.source):
            target = dest / f.relative_to(c.source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    else:
        shutil.copy2(c.source, dest)


# ---------------------------------------------------------------------------------------------
# config.yaml


def portable_config(cfg, placed: dict[str, str]):
    """A copy of `cfg` whose paths hold anywhere: `placed` (config key -> path in the run) for what
    was copied, absolute paths for other local files, the embedded model by its name."""
    snap = cfg.model_copy(deep=True)
    d = snap.data
    d.train = [_absolute(p) for p in d.train]
    v = d.validation
    if isinstance(v, str):
        d.validation = placed.get("data.validation") or _absolute(v)
    elif isinstance(v, list):
        d.validation = [placed.get(f"data.validation[{i}]") or _absolute(p) for i, p in enumerate(v)]
    elif isinstance(v, dict):
        d.validation = {n: placed.get(f"data.validation.{n}") or _absolute(p) for n, p in v.items()}
    if d.test:
        d.test = placed.get("data.test") or _absolute(d.test)
    if d.chat_template:
        d.chat_template = placed.get("data.chat_template") or _absolute(d.chat_template)
    snap.model.name = model_name(snap.model.name)
    tok = snap.model.tokenizer
    if tok and Path(tok).expanduser().exists():
        snap.model.tokenizer = _absolute(tok)
    return snap


def model_name(name: str) -> str:
    """model.name as a run stores it: the embedded model's cache directory (what `embedded:smollm2`
    resolved to at train time) by its name, another local path absolute, a hub id unchanged."""
    p = Path(name).expanduser()
    if not p.exists():
        return name
    if p.resolve() == (cache_dir() / DEMO_MODEL_DIRNAME).resolve():
        return EMBEDDED_SMOLLM2
    return _absolute(name)


def _absolute(p: str | Path) -> str:
    return os.path.abspath(os.path.expanduser(str(p)))
