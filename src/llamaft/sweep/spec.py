"""The sweep spec: what to vary, what to optimize, how to search; checked whole before anything trains.

    sweep:                                   # SWEEP.yaml, or a `sweep:` section of the run config
      objective: eval/small_val/loss         # eval/<validation set>/<metric>
      direction: minimize                    # default: minimize for loss / perplexity, else maximize
      method: tpe                            # tpe | random | grid
      trials: 20                             # budget (grid: default the whole grid)
      timeout: 2h                            # optional wall-time budget: no new trial starts after it
      pruner: median                         # median | halving | none, or {median: {startup_trials: 2}}
      gpus_per_trial: 1                      # processes per trial (DDP / FSDP over that many GPUs; gloo on CPU)
      space:
        train.learning_rate: {log_uniform: [1e-5, 5e-4]}
        lora.r: [8, 16, 32, 64]
        lora.alpha: {factor_of: lora.r, values: [1, 2]}

A mistake is one ConfigError naming the spec file and the key (`SWEEP.yaml: sweep.space.lora.rr:
unknown config key (did you mean 'lora.r'?)`): every listed value and both ends of every range are
put into the base config and validated by the config's own rules.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..config import RunConfig, config_from_dict
from ..errors import ConfigError, LlamaftError
from ..eval.generation import gen_config_for
from ..eval.metrics import BUILTIN
from ..train.preference import SUMMARY_METRICS as PREFERENCE_METRICS

METHODS = ("tpe", "random", "grid")
PRUNERS = {"median": ("startup_trials", "warmup_steps"), "halving": ("min_resource", "reduction_factor"), "none": ()}
SPEC_KEYS = ("objective", "direction", "method", "trials", "timeout", "seed", "pruner", "space", "workers",
             "gpus_per_trial", "start_with", "output_dir")
_GEN_EXTRA = ("stops_on_eos", "mean_new_tokens")
_KINDS = ("values", "log_uniform", "uniform", "int", "factor_of")
_PER_TRIAL = ("train.output_dir", "train.resume")


@dataclass
class Param:
    """One swept config key. kind: values (a list to choose from), log_uniform / uniform (floats),
    int (whole numbers), factor_of (one of `values` times the value of the key `of`)."""

    key: str
    kind: str
    values: list = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    step: int = 1
    of: str | None = None

    @property
    def name(self) -> str:
        """The name Optuna knows it by (a factor_of key samples the factor)."""
        return f"{self.key}/{self.of}" if self.kind == "factor_of" else self.key

    @property
    def choices(self) -> list:
        """What Optuna chooses among: the values, or their positions when one is not a plain scalar
        (Optuna's categorical values are None, bool, int, float or str; a list of modules is not)."""
        scalar = all(v is None or isinstance(v, (bool, int, float, str)) for v in self.values)
        return list(self.values) if scalar else list(range(len(self.values)))

    def value(self, choice):
        """The config value (or factor) of an Optuna choice."""
        return choice if self.choices == self.values else self.values[choice]


@dataclass
class Spec:
    objective: str  # eval/<set>/<metric>
    direction: str  # minimize | maximize
    method: str
    trials: int
    timeout: float | None
    seed: int
    pruner: dict  # {"kind": ..., options}
    params: list[Param]
    workers: str | int = "auto"
    gpus_per_trial: int = 1  # processes of each trial: one per GPU of the worker's group (CPU: gloo processes)
    start_with: list[dict] = field(default_factory=list)
    output_dir: str | None = None

    @property
    def set_name(self) -> str:
        return self.objective.split("/")[1]

    @property
    def metric(self) -> str:
        return self.objective.split("/", 2)[2]

    def grid(self) -> dict[str, list]:
        return {p.name: p.choices for p in self.params}


def set_key(raw: dict, key: str, value: Any) -> dict:
    """`raw` (a config as a dict) with the dotted `key` set to `value`, sections created as needed."""
    node = raw
    *head, last = key.split(".")
    for part in head:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def get_key(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def apply_params(base: dict, params: list[Param], values: dict[str, Any]) -> dict:
    """The base config (a dict) with a trial's values: `values` by Param.name (factors resolved)."""
    raw = copy.deepcopy(base)
    params = [p for p in params if p.name in values]  # a trial killed while it was being sampled lacks some
    for p in params:
        if p.kind == "values":
            set_key(raw, p.key, p.value(values[p.name]))
        elif p.kind != "factor_of":
            set_key(raw, p.key, values[p.name])
    for p in params:
        if p.kind == "factor_of":
            set_key(raw, p.key, p.value(values[p.name]) * get_key(raw, p.of))
    return raw


# ---------------------------------------------------------------------------------------------
# parsing


def parse_spec(raw: Any, base: dict, source: str) -> Spec:
    """The spec from its YAML mapping (the `sweep:` section's content); `base` is the run config as a dict."""
    where = f"{source}: sweep"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with objective:, space:, ...")
    for key in raw:
        if key not in SPEC_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key{_close(str(key), SPEC_KEYS)}")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}.space: give at least one config key to vary, e.g. train.learning_rate: [1e-4, 3e-5]")
    params = [parse_param(str(k), v, base, f"{where}.space.{k}") for k, v in space.items()]
    _check_factors(params, base, where)
    objective, direction = _objective(raw, base, where)
    method = raw.get("method", "tpe")
    if method not in METHODS:
        raise ConfigError(f"{where}.method: '{method}' is not one of {', '.join(METHODS)}")
    if method == "grid":
        for p in params:
            if p.kind not in ("values", "factor_of"):
                raise ConfigError(f"{where}.space.{p.key}: method grid needs a list of values, not a {p.kind} range")
    trials = raw.get("trials", _grid_size(params) if method == "grid" else 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"{where}.trials: expected a whole number of trials >= 1 (got {trials!r})")
    spec = Spec(objective, direction, method, trials, _timeout(raw.get("timeout"), where), _int(raw, "seed", 0, where),
                _pruner(raw.get("pruner", "median"), where), params, _workers(raw.get("workers", "auto"), where),
                _gpus_per_trial(raw.get("gpus_per_trial", 1), params, base, where), output_dir=raw.get("output_dir"))
    spec.start_with = _start_with(raw.get("start_with", []), spec, base, where)
    return spec


def parse_param(key: str, value: Any, base: dict, where: str) -> Param:
    _check_key(key, where)
    if key in _PER_TRIAL:
        raise ConfigError(f"{where}: {key} is set by the sweep for each trial (SWEEP/trial-NNNN, a fresh run); it cannot be swept")
    if isinstance(value, list):
        value = {"values": value}
    kinds = set(value) & set(_KINDS) if isinstance(value, dict) else set()
    if "factor_of" in kinds:
        kinds.discard("values")  # factor_of comes with its values
    if len(kinds) != 1:
        raise ConfigError(f"{where}: bad distribution {value!r}: use a list of values, {{log_uniform: [lo, hi]}}, "
                          "{uniform: [lo, hi]}, {int: [lo, hi]} or {factor_of: KEY, values: [...]}")
    kind = kinds.pop()
    extra = set(value) - {kind, "values", "step"}
    if extra:
        raise ConfigError(f"{where}: unknown option '{sorted(extra)[0]}' of a {kind} distribution")
    if kind in ("values", "factor_of"):
        values = value.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: empty list of values (give at least one)")
        param = Param(key, kind, values=list(values), of=value.get("factor_of"))
        if kind == "values":
            for v in values:
                _validate(base, key, v, where)
        return param
    ends = value[kind]
    if not (isinstance(ends, list) and len(ends) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ends)):
        raise ConfigError(f"{where}: {kind} needs [low, high] (two numbers), got {ends!r}")
    low, high = ends
    if not low < high:
        raise ConfigError(f"{where}: empty range [{low}, {high}]: low must be below high")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform needs low > 0 (got {low})")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: int needs whole numbers, got [{low}, {high}]")
    for v in ((int(low), int(high)) if kind == "int" else (float(low), float(high))):
        _validate(base, key, v, where)
    return Param(key, kind, low=low, high=high, step=int(value.get("step", 1)))


def _check_key(key: str, where: str) -> None:
    """The dotted key names a field of the run config (sections down to a leaf)."""
    model: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            options = [".".join(parts[:i] + [f]) for f in (fields or {})]
            raise ConfigError(f"{where}: unknown config key '{key}'{_close('.'.join(parts[:i + 1]), options)}")
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is not None:
        raise ConfigError(f"{where}: '{key}' is a section; vary one of its keys (e.g. {key}.{next(iter(model.model_fields))})")


def _validate(base: dict, key: str, value: Any, where: str) -> None:
    try:
        config_from_dict(set_key(copy.deepcopy(base), key, value), "config")
    except LlamaftError as err:
        raise ConfigError(f"{where}: value {value!r} is not valid here ({str(err).removeprefix('config: ')})") from None


def _check_factors(params: list[Param], base: dict, where: str) -> None:
    keys = {p.key for p in params}
    for p in params:
        if p.kind != "factor_of":
            continue
        if not isinstance(p.of, str):
            raise ConfigError(f"{where}.space.{p.key}: factor_of names a config key, e.g. factor_of: lora.r")
        _check_key(p.of, f"{where}.space.{p.key}.factor_of")
        if p.of not in keys and not isinstance(get_key(base, p.of), (int, float)):
            raise ConfigError(f"{where}.space.{p.key}: factor_of {p.of}: that key holds no number")
        if any(q.key == p.of and q.kind == "factor_of" for q in params):
            raise ConfigError(f"{where}.space.{p.key}: factor_of {p.of}, which is itself a factor_of key")
        for f in p.values:
            if not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 0:
                raise ConfigError(f"{where}.space.{p.key}: factors must be positive numbers (got {f!r})")


def _grid_size(params: list[Param]) -> int:
    n = 1
    for p in params:
        n *= len(p.values)
    return n


def _close(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _int(raw: dict, key: str, default: int, where: str) -> int:
    v = raw.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"{where}.{key}: expected a whole number (got {v!r})")
    return v


def _objective(raw: dict, base: dict, where: str) -> tuple[str, str]:
    """(eval/<set>/<metric>, direction): the set must be one the base config evaluates, the metric one
    it logs for that set (loss, and perplexity for sft or the preference metrics for dpo / orpo / simpo;
    generation metrics when eval.generation names them)."""
    from ..data.sources import validation_sets

    text = raw.get("objective")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}.objective: name the metric to optimize, e.g. eval/validation/loss")
    words = text.split()
    direction = raw.get("direction", words[1] if len(words) == 2 else None)
    m = re.fullmatch(r"eval/([^/]+)/(.+)", words[0])
    if m is None or len(words) > 2:
        raise ConfigError(f"{where}.objective: '{text}' is not eval/<validation set>/<metric> [min|max]")
    name, metric = m.groups()
    cfg = config_from_dict(base, "config")
    spec_sets = cfg.data.validation
    # a mapping names its sets itself; a file, list or directory is read for the names (missing: one line)
    named = list(spec_sets) if isinstance(spec_sets, dict) else list(validation_sets(spec_sets))
    sets = named or (["validation"] if cfg.data.val_ratio > 0 else [])
    if name not in sets:
        raise ConfigError(f"{where}.objective: no validation set named '{name}' (sets: {', '.join(sets) or 'none'})")
    gen = gen_config_for(cfg.eval, name)
    names = ["loss"] + (list(PREFERENCE_METRICS) if cfg.train.objective != "sft" else ["perplexity"])
    names += [m.rpartition(":")[2] for m in gen.metrics] + list(_GEN_EXTRA) if gen else []
    custom = gen is not None and any(m not in BUILTIN for m in gen.metrics)  # may return a dict of any names
    if metric not in names and not custom:
        hint = "" if gen else f" (generation metrics need eval.generation.{name})"
        raise ConfigError(f"{where}.objective: set '{name}' logs no metric '{metric}' (it logs: {', '.join(names)}){hint}")
    aliases = {"min": "minimize", "max": "maximize", "minimize": "minimize", "maximize": "maximize", None: None}
    if direction not in aliases:
        raise ConfigError(f"{where}.direction: '{direction}' is not minimize or maximize")
    lower_is_better = metric in ("loss", "perplexity") or metric.endswith("_loss")
    return words[0], aliases[direction] or ("minimize" if lower_is_better else "maximize")


def _timeout(v: Any, where: str) -> float | None:
    """Seconds: a number, or '90s' / '30m' / '2h'."""
    if v is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(v))
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"{where}.timeout: '{v}' is not a duration (seconds, or e.g. 30m, 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _pruner(v: Any, where: str) -> dict:
    """{"kind": median | halving | none, options}; a bare name takes the defaults."""
    if v is None or v is False:
        v = "none"
    kind, options = (v, {}) if isinstance(v, str) else next(iter(v.items())) if isinstance(v, dict) and len(v) == 1 else (None, {})
    if kind not in PRUNERS or not isinstance(options, dict):
        raise ConfigError(f"{where}.pruner: expected one of {', '.join(PRUNERS)} (or {{median: {{startup_trials: 2}}}}), got {v!r}")
    for k, value in options.items():
        if k not in PRUNERS[kind]:
            raise ConfigError(f"{where}.pruner.{kind}.{k}: unknown option{_close(str(k), PRUNERS[kind])}")
        if not (isinstance(value, int) and value >= 0) and not (k == "min_resource" and value == "auto"):
            raise ConfigError(f"{where}.pruner.{kind}.{k}: expected a whole number >= 0 (got {value!r})")
    return {"kind": kind, **options}


def _workers(v: Any, where: str) -> str | int:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ConfigError(f"{where}.workers: expected auto (one per GPU) or a number >= 1 (got {v!r})")


def _gpus_per_trial(v: Any, params: list[Param], base: dict, where: str) -> int:
    """Processes per trial: the batch divides among them (train/distributed.per_process) in the base
    config and at every listed train.gradient_accumulation (a range's odd values fail their trials)."""
    from ..train.distributed import per_process

    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{where}.gpus_per_trial: expected a whole number >= 1 (got {v!r})")
    key = "train.gradient_accumulation"
    for accum in next((p.values for p in params if p.key == key and p.kind == "values"), [get_key(base, key)]):
        try:
            per_process(config_from_dict(set_key(copy.deepcopy(base), key, accum), "config"), v)
        except ConfigError as err:
            raise ConfigError(f"{where}.gpus_per_trial: {v}: {err}") from None
    return v


def _start_with(v: Any, spec: Spec, base: dict, where: str) -> list[dict]:
    """Trials to run first (Optuna's enqueue_trial): {key: value} for every swept key; a factor_of key
    takes its factor."""
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ConfigError(f"{where}.start_with: expected a list of {{key: value}} mappings")
    by_key = {p.key: p for p in spec.params}
    out = []
    for i, trial in enumerate(v):
        for key in trial:
            if key not in by_key:
                raise ConfigError(f"{where}.start_with[{i}].{key}: not a key of sweep.space{_close(str(key), by_key)}")
        missing = [k for k in by_key if k not in trial]
        if missing:
            raise ConfigError(f"{where}.start_with[{i}]: give a value for {missing[0]} too (every swept key)")
        for key, value in trial.items():
            p = by_key[key]
            if p.kind in ("values", "factor_of"):
                if value not in p.values:
                    raise ConfigError(f"{where}.start_with[{i}].{key}: {value!r} is not one of {p.values}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high:
                raise ConfigError(f"{where}.start_with[{i}].{key}: {value!r} is outside [{p.low}, {p.high}]")
        out.append({by_key[k].name: by_key[k].choices[by_key[k].values.index(v)] if by_key[k].kind in ("values", "factor_of")
                    else v for k, v in trial.items()})
    return out
