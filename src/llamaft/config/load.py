"""Loading a run config: YAML (duplicate keys refused) + dotted `key=value` overrides -> RunConfig,
with errors that name the file, line or dotted key and the closest valid key.

    cfg = load_config("configs/llama-3.1-8b-lora.yaml", ["lora.r=32", "train.learning_rate=2e-4"])
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..paths import write_text_atomic
from .sections import RunConfig


# ---------------------------------------------------------------------------------------------
# Error messages that name the key (and the closest valid one)


def _fields_at(path: list[str]) -> list[str]:
    """Valid field names at a dotted path inside RunConfig (for 'did you mean')."""
    model: Any = RunConfig
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _suggest(path: list[str], key: str) -> str:
    close = difflib.get_close_matches(key, _fields_at(path), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{'.'.join(path + [close[0]])}'?)"
    valid = _fields_at(path)
    return f" (valid keys: {', '.join(valid)})" if valid else ""


# Union members show up in pydantic's error locations as type tags ('str', 'list[str]'): not keys.
_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\])$")
_KINDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false", "none": "null",
          "list": "a list", "dict": "a mapping", "literal": "one of the listed words"}


def _union_head(loc) -> tuple[list[str], str | None]:
    """(key parts before the first union tag, that tag's kind) of an error location."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and _TAG.match(part):
            return [str(p) for p in loc[:i]], part.split("[")[0]
    return [str(p) for p in loc], None


def _format_error(err: ValidationError, source: str) -> str:
    errors = err.errors()
    first = errors[0]
    loc, tag = _union_head(first["loc"])
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{_suggest(loc[:-1], loc[-1])}"
    if first["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    got = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    same = [e for e in errors if _union_head(e["loc"])[0] == loc]
    if tag is not None and len(same) > 1:  # a value that fits none of a union's types: say what would fit
        kinds = list(dict.fromkeys(_KINDS.get(_union_head(e["loc"])[1] or "", "another type") for e in same))
        msg = "expected " + (", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0])
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    rest = len({tuple(_union_head(e["loc"])[0]) for e in errors}) - 1
    more = f" [+{rest} more]" if rest > 0 else ""
    if not key and (named := re.match(r"^([a-z_]+\.[a-z_.]+): (.*)$", msg)):  # a cross-section rule names its key
        key, msg, got_s = named.group(1), named.group(2), ""
    where = f"key '{key}'" if key else "config"
    return f"{source}: {where}: {msg}{got_s}{more}"



# ---------------------------------------------------------------------------------------------
# Dotted overrides


def _parse_value(text: str) -> Any:
    """Override values use YAML syntax: 32, 2e-4, true, [q_proj, v_proj], null."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '2e-4' as a string; users mean a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. lora.r=32)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if part not in _fields_at(parts[:i]) and not isinstance(node.get(part), dict):
                raise ConfigError(f"override '{key}': unknown key '{'.'.join(parts[: i + 1])}'{_suggest(parts[:i], part)}")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw



# ---------------------------------------------------------------------------------------------
# YAML, duplicate keys refused


def _scalar(node) -> str:
    return f": {node.value}" if isinstance(node, yaml.ScalarNode) and node.value else ""


def _check_duplicate_keys(node, path: list[str], source: str) -> None:
    """yaml.safe_load keeps the last of two equal keys without a word (a second `a:` under
    data.validation would silently replace the first set): here that is an error naming both."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, path + [str(i)], source)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict = {}
    for key_node, value_node in node.value:
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
        if key in seen:
            first_line, first_value = seen[key]
            raise ConfigError(
                f"{source}:line {key_node.start_mark.line + 1}: key '{'.'.join(path + [key])}' appears twice "
                f"(line {first_line}{_scalar(first_value)}; line {key_node.start_mark.line + 1}{_scalar(value_node)}); "
                "keep one (YAML would silently use the last)"
            )
        seen[key] = (key_node.start_mark.line + 1, value_node)
        _check_duplicate_keys(value_node, path + [key], source)


def read_yaml_file(path: Path, missing: str = "file not found") -> Any:
    """`read_yaml` with a user's mistakes as one-line ConfigErrors: `path: <missing>`, or the line of
    the YAML error."""
    if not path.is_file():
        raise ConfigError(f"{path}: {missing}")
    try:
        return read_yaml(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None


def read_yaml(path: Path) -> Any:
    loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, [], str(path))
        return loader.construct_document(node)
    finally:
        loader.dispose()



# ---------------------------------------------------------------------------------------------
# Loading and saving


def config_from_dict(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None, *, snapshot: bool = False,
                raw: Any = None) -> RunConfig:
    """`snapshot`: a run directory's config.yaml, possibly written by an older llamaft (kept loadable).
    A run's config.yaml is read with its relative paths against the run (see resolve_paths), also when
    it is passed as a training config (`llamaft train RUN/config.yaml train.resume=true`).
    `raw`: the file's content when the caller has read it already (`llamaft sweep`: less its sweep: section)."""
    path = Path(path)
    if raw is None:
        raw = read_yaml_file(path, "config file not found") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with model:, data:, ...")
    if snapshot and isinstance(raw.get("train"), dict) and isinstance(raw["train"].get("max_steps"), int) \
            and raw["train"]["max_steps"] <= 0:
        raw["train"]["max_steps"] = None  # older snapshots stored HF's "-1 = use epochs"
    raw = apply_overrides(raw, overrides or [])
    cfg = config_from_dict(raw, str(path))
    run = snapshot or (path.name == "config.yaml" and (path.parent / RUN_SOURCES).is_file())
    return resolve_paths(cfg, path.parent, run=run)


def resolve_paths(cfg: RunConfig, base: Path, *, run: bool = False) -> RunConfig:
    """Relative data/template/model paths of a YAML file in `base`.

    A user's YAML: relative to the working directory, as typed; only a path that exists nowhere there
    but does beside the YAML is taken from the YAML's folder. A run's config.yaml (`run`): relative to
    the run directory first, because train stores its copies there as `data/...` (see
    train/portable.py) and a project's own ./data in the working directory must never stand in for
    them; the copies it lists resolve into the run even when missing, so an error names the run's
    path. Older snapshots stored paths relative to the directory training ran in: still found there.
    """
    listed = set(read_sources(base)) if run else set()

    def fix(p: str) -> str:
        if Path(p).is_absolute():
            return p
        cand = base / p
        if run and (cand.exists() or Path(p).as_posix() in listed):
            return str(cand)
        return str(cand) if not Path(p).exists() and cand.exists() else p

    d = cfg.data
    d.train = [fix(p) for p in d.train]
    if isinstance(d.validation, str):
        d.validation = fix(d.validation)
    elif isinstance(d.validation, list):
        d.validation = [fix(v) for v in d.validation]
    elif isinstance(d.validation, dict):
        d.validation = {k: fix(v) for k, v in d.validation.items()}
    if d.test:
        d.test = fix(d.test)
    if d.chat_template:
        d.chat_template = fix(d.chat_template)
    if not Path(cfg.model.name).is_absolute() and (base / cfg.model.name).exists() and not Path(cfg.model.name).exists():
        cfg.model.name = str(base / cfg.model.name)
    return cfg


# A run directory's data manifest: every file train copied or wrote into RUN/data/, by its path
# relative to the run, with where it came from: {"data/alpha.jsonl": {"origin": "/abs/alpha.jsonl",
# "key": "data.validation.alpha"}, "data/split/validation.jsonl": {"origin": "/abs/train.jsonl",
# "key": "data.train", "split": "validation", "rows": 3}}. Errors name the origin when a copy is gone.
RUN_SOURCES = "data/sources.json"


def read_sources(run_dir: str | Path) -> dict[str, dict]:
    """The run's data manifest ({} when it has none: older runs, or a plain YAML's folder)."""
    try:
        found = json.loads((Path(run_dir) / RUN_SOURCES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """The resolved config as YAML (a run's config.yaml snapshot), written atomically."""
    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
