"""The Trainer callbacks the recipe attaches: metrics.jsonl, and per-set eval metrics at every evaluation.

metrics.jsonl: every HF log event, renamed to our keys; strict JSON (no bare NaN/Infinity).

    {"step": 10, "epoch": 0.5, "train/loss": 2.31, "train/learning_rate": 0.0002, "train/grad_norm": 1.7}
    {"step": 10, "epoch": 0.5, "eval/validation/loss": 2.40, "eval/validation/runtime_s": 0.8}
    {"step": 11, "epoch": 0.55, "train/loss": null, "train/grad_norm": null, ..., "nonfinite": {"train/loss": "nan", "train/grad_norm": "nan"}}

A value that is not a finite number is written as null, and the row's "nonfinite" object says which
keys those were and what they held ("nan", "inf", "-inf"): readers that skip nulls keep working, and
the plot can still show the step as diverged.

HF names a set's metrics `eval_<set>_<metric>` (eval_dataset is a dict); set names may contain `_`,
so the callback is told the names and matches the longest one.

Per-set eval metrics (`GenerationEvalCallback`, built by `make_eval_callback`): the HF Trainer
evaluates a dict of validation sets one by one and fires `on_evaluate` once per set with that set's
metrics (`eval_<set>_loss`). For each set we log, in one event at the same step:

    eval/<set>/perplexity                      exp(loss), for every set
    eval/<set>/<metric>                        when cfg.eval.generation names the set (or "*"):
    eval/<set>/stops_on_eos, .../mean_new_tokens, .../samples, .../prompts_truncated

The generation metrics come from eval's scoring library (`llamaft.eval.generation`): training calls
eval, never the other way round. Logging goes through `trainer.log` in the Trainer's own spelling,
`eval_<set>_<metric>` (like `eval_<set>_loss`), so every `on_log` consumer treats them like the loss:
the metrics.jsonl renamer above turns them into `eval/<set>/<metric>`, TensorBoard shows them next to
the loss. Without a trainer (log=None) the callback appends `{"step": N, "eval/<set>/<metric>": ...}`
lines to metrics.jsonl itself. The model is put in eval mode for generation (no dropout; no grad
inside generate_batch) and back in train mode afterwards, so training continues exactly as before.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from ..data.pipeline import split_conversations
from ..data.sources import validation_sets
from ..eval.generation import check_generation_sets, generation_metrics
from ..eval.metrics import perplexity
from ..paths import write_text_atomic

log = logging.getLogger(__name__)

_TRAIN_KEYS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}
_RENAME = {"runtime": "runtime_s"}


def json_safe(value):
    """Non-finite floats → None, through dicts and lists (for json.dumps(..., allow_nan=False))."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def rename_logs(logs: dict, set_names: list[str]) -> dict:
    """HF log keys → ours; values that are not finite numbers become null (JSON has no NaN) and are
    listed under "nonfinite"."""
    out: dict = {}
    nonfinite: dict = {}
    by_length = sorted(set_names, key=len, reverse=True)
    for key, value in logs.items():
        if key == "epoch":
            continue
        if key in _TRAIN_KEYS:
            new = _TRAIN_KEYS[key]
        elif key.startswith("eval_"):
            rest = key[len("eval_"):]
            name = next((n for n in by_length if rest.startswith(n + "_")), None)
            if name is None:  # a single unnamed eval set
                name, metric = "validation", rest
            else:
                metric = rest[len(name) + 1:]
            new = f"eval/{name}/{_RENAME.get(metric, metric)}"
        elif key.startswith("train_"):  # end-of-training summary (train_loss = mean over the run)
            metric = key[len("train_"):]
            new = "train/mean_loss" if metric == "loss" else f"train/{_RENAME.get(metric, metric)}"
        else:
            new = f"train/{key}"
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite[new] = str(value)  # "nan", "inf", "-inf"
            value = None
        out[new] = value
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


class MetricsJsonlCallback(TrainerCallback):
    """Appends one JSON line per log event to RUN/metrics.jsonl."""

    def __init__(self, path: str | Path, set_names: list[str]):
        self.path = Path(path)
        self.set_names = list(set_names)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch, 6) if state.epoch is not None else None}
        row.update(rename_logs(logs, self.set_names))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """On resume, drop lines logged after the checkpoint: they will be logged again."""
    p = Path(path)
    rows = [r for r in read_metrics(p) if r.get("step", 0) <= last_step and "train/mean_loss" not in r]
    write_text_atomic(p, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# Per-set eval metrics at every evaluation


def metric_key(set_name: str, metric: str) -> str:
    """The one spelling of an eval metric in metrics.jsonl / TensorBoard / the report."""
    return f"eval/{set_name}/{metric}"


def hf_key(key: str) -> str:
    """eval/<set>/<metric> -> eval_<set>_<metric>, the spelling HF log consumers expect."""
    _, set_name, metric = key.split("/", 2)
    return f"eval_{set_name}_{metric}"


def logged_loss(metrics: dict, set_name: str, n_sets: int) -> float | None:
    """This set's loss in the HF metrics of one evaluate() call (eval_<set>_loss, or eval_loss for a lone set)."""
    if f"eval_{set_name}_loss" in metrics:
        return float(metrics[f"eval_{set_name}_loss"])
    if n_sets == 1 and "eval_loss" in metrics:
        return float(metrics["eval_loss"])
    return None


class GenerationEvalCallback(TrainerCallback):
    """Adds perplexity and generation metrics for every named validation set at each evaluation."""

    def __init__(self, eval_cfg, tokenizer, rules, sets: dict[str, list], *, log: Callable[[dict], None] | None = None,
                 metrics_path: str | Path | None = None, generate: Callable | None = None, perplexity: bool = True,
                 every_rank: bool = False):
        """sets: validation set name -> conversations (`split_conversations(...).validation`); log: e.g. trainer.log;
        perplexity: False for preference objectives, whose eval loss is the DPO / ORPO / SimPO loss, no token NLL.
        every_rank: every process generates (FSDP: each forward needs them all; greedy, so all generate alike),
        rank 0 alone logs; else rank 0 alone generates."""
        self.perplexity = perplexity
        self.eval_cfg = eval_cfg
        self.tokenizer = tokenizer
        self.rules = rules
        self.sets = sets
        self.plan = check_generation_sets(eval_cfg, list(sets))
        self.log_fn = log
        self.metrics_path = metrics_path
        self.generate = generate
        self.every_rank = every_rank
        self.last: dict[str, dict] = {}  # set -> latest logged values (for summary.json / tests)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or not (state.is_world_process_zero or self.every_rank):
            return
        for name in self.sets:
            loss = logged_loss(metrics, name, len(self.sets))
            if loss is None:
                continue  # this on_evaluate call is for another set
            values = {metric_key(name, "perplexity"): perplexity(loss) if math.isfinite(loss) else float("nan")} if self.perplexity else {}
            if name in self.plan and model is not None:
                gen_metrics = self._generate_for(model, name)
                values.update({metric_key(name, k): v for k, v in gen_metrics.items()})
            self.last[name] = values
            if values and state.is_world_process_zero:
                self._emit(values, state.global_step, args)

    def _generate_for(self, model, name: str) -> dict:
        was_training = model.training
        model.eval()
        try:
            metrics, _ = generation_metrics(model, self.tokenizer, self.rules, self.sets[name], self.plan[name],
                                            self.eval_cfg, generate=self.generate)
        finally:
            if was_training:
                model.train()
        if metrics.get("prompts_truncated"):
            log.warning("eval set '%s': %d prompts longer than eval.max_prompt_tokens=%d were cut from the left",
                        name, metrics["prompts_truncated"], self.eval_cfg.max_prompt_tokens)
        return metrics

    def _emit(self, values: dict, step: int, args) -> None:
        if self.log_fn is not None:
            self.log_fn({hf_key(k): v for k, v in values.items()})
            return
        path = Path(self.metrics_path or Path(args.output_dir) / "metrics.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}, allow_nan=True) + "\n")


DURING_TRAINING_NOTE = (
    "`eval` is the last evaluation during training: loss and perplexity over every example of each validation set, "
    "generation metrics over a fixed sample of its rows (eval.generation.<set>.max_samples; the same rows at every "
    "evaluation). `llamaft eval RUN` scores every row and writes RUN/eval/eval.json: those are the full-set numbers."
)


def eval_scope(eval_cfg, rows: dict[str, int], examples: dict[str, int], objective: str = "sft") -> dict:
    """summary.json's `eval_during_training`: what each set's numbers in `eval` were computed on.
    rows: set -> its rows (conversations); examples: set -> its token examples (what the loss covers);
    objective: dpo / orpo / simpo sets are scored by the preference loss and metrics, not perplexity."""
    plan = check_generation_sets(eval_cfg, list(rows))
    sets = {}
    for name, n_rows in rows.items():
        entry = {"rows": n_rows, "loss_examples": examples.get(name, 0)}
        if name in plan:
            n = min(plan[name].max_samples, n_rows)
            entry["generation_rows"] = n
            entry["note"] = (f"generation metrics on all {n} rows" if n == n_rows
                             else f"generation metrics on a fixed sample of {n} of {n_rows} rows")
        else:
            scored = "loss and perplexity" if objective == "sft" else f"{objective} loss and preference metrics"
            entry["note"] = f"{scored} only (eval.generation does not name this set)"
        sets[name] = entry
    return {"note": DURING_TRAINING_NOTE, "sets": sets}


def make_eval_callback(cfg, tokenizer, rules, *, log: Callable[[dict], None] | None = None,
                       sets: dict[str, list] | None = None, metrics_path: str | Path | None = None,
                       every_rank: bool = False) -> GenerationEvalCallback:
    """The callback for a run config.

    sets: validation set names -> conversations (training passes the ones it already read); default:
    read from cfg.data (same split as training) when generation is configured, else just the names.
    """
    if sets is None:
        if cfg.eval.generation:
            sets = split_conversations(cfg.data).validation
        else:  # perplexity only: the names are enough
            names = list(validation_sets(cfg.data.validation)) or (["validation"] if cfg.data.val_ratio > 0 else [])
            sets = {name: [] for name in names}
    return GenerationEvalCallback(cfg.eval, tokenizer, rules, sets, log=log, metrics_path=metrics_path,
                                  perplexity=cfg.train.objective == "sft", every_rank=every_rank)


def attach_eval_callback(trainer, cfg, tokenizer, rules, sets: dict[str, list],
                         every_rank: bool = False) -> GenerationEvalCallback:
    """Create the callback over the validation conversations, log through `trainer.log`, add it to the trainer."""
    cb = make_eval_callback(cfg, tokenizer, rules, log=trainer.log, sets=sets, every_rank=every_rank)
    trainer.add_callback(cb)
    return cb


def tensorboard_callbacks(run_dir: Path, report_to: list[str]) -> list:
    if "tensorboard" not in report_to:
        return []
    # Late: transformers.integrations probes every logging integration on import (seconds), and
    # tensorboard itself is optional.
    from transformers.integrations import TensorBoardCallback

    cb = TensorBoardCallback()
    # HF 5 has no logging_dir argument; the callback (re)opens its writer here, also for the final
    # evaluate() after on_train_end closed it.
    cb.logging_dir = str(run_dir / "tb")
    return [cb]
