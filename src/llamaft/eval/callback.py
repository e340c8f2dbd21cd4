"""Per-set perplexity and generation metrics at every evaluation during training.

    cb = attach_eval_callback(trainer, cfg, tokenizer, rules)   # logs through trainer.log

The HF Trainer evaluates a dict of validation sets one by one and fires `on_evaluate` once per set
with that set's metrics (`eval_<set>_loss`). For each set we log, in one event at the same step:

    eval/<set>/perplexity                      exp(loss), for every set
    eval/<set>/<metric>                        when cfg.eval.generation names the set (or "*"):
    eval/<set>/stops_on_eos, .../mean_new_tokens, .../samples, .../prompts_truncated

Logging goes through `trainer.log` in the Trainer's own spelling, `eval_<set>_<metric>` (like
`eval_<set>_loss`), so every `on_log` consumer treats them like the loss: metrics.jsonl's renamer
(train/callbacks.py) turns them into `eval/<set>/<metric>`, TensorBoard shows them next to the loss.
Without a trainer (log=None) the callback appends `{"step": N, "eval/<set>/<metric>": ...}` lines
to metrics.jsonl itself.

The model is put in eval mode for generation (no dropout; no grad inside generate_batch) and back in
train mode afterwards, so training continues exactly as before.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from ..errors import LlamaftError
from .generation import gen_config_for, generation_metrics, load_conversations
from .metrics import check_metrics, perplexity

log = logging.getLogger(__name__)


def metric_key(set_name: str, metric: str) -> str:
    """The one spelling of an eval metric in metrics.jsonl / TensorBoard / the report."""
    return f"eval/{set_name}/{metric}"


def hf_key(key: str) -> str:
    """eval/<set>/<metric> -> eval_<set>_<metric>, the spelling HF log consumers expect."""
    _, set_name, metric = key.split("/", 2)
    return f"eval_{set_name}_{metric}"


def set_loss(metrics: dict, set_name: str, n_sets: int) -> float | None:
    """This set's loss in the HF metrics of one evaluate() call (eval_<set>_loss, or eval_loss for a lone set)."""
    if f"eval_{set_name}_loss" in metrics:
        return float(metrics[f"eval_{set_name}_loss"])
    if n_sets == 1 and "eval_loss" in metrics:
        return float(metrics["eval_loss"])
    return None


def check_generation_sets(eval_cfg, set_names: list[str]) -> dict:
    """{set: GenerationEvalConfig} for the sets that get generation metrics; bad names are user errors."""
    for name in eval_cfg.generation:
        if name != "*" and name not in set_names:
            raise LlamaftError(f"eval.generation.{name}: no validation set named '{name}' "
                               f"(sets: {', '.join(set_names) or 'none'}; use '*' for all)")
    plan = {}
    for name in set_names:
        gen = gen_config_for(eval_cfg, name)
        if gen is not None:
            try:
                check_metrics(gen.metrics, gen.labels)
            except LlamaftError as err:
                key = name if name in eval_cfg.generation else "*"
                raise LlamaftError(f"eval.generation.{key}.metrics: {err}") from None
            plan[name] = gen
    return plan


class GenerationEvalCallback(TrainerCallback):
    """Adds perplexity and generation metrics for every named validation set at each evaluation."""

    def __init__(self, eval_cfg, tokenizer, rules, sets: dict[str, list], *, log: Callable[[dict], None] | None = None,
                 metrics_path: str | Path | None = None, generate: Callable | None = None):
        """sets: validation set name -> conversations (see `load_conversations`); log: e.g. trainer.log."""
        self.eval_cfg = eval_cfg
        self.tokenizer = tokenizer
        self.rules = rules
        self.sets = sets
        self.plan = check_generation_sets(eval_cfg, list(sets))
        self.log_fn = log
        self.metrics_path = metrics_path
        self.generate = generate
        self.last: dict[str, dict] = {}  # set -> latest logged values (for summary.json / tests)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        for name in self.sets:
            loss = set_loss(metrics, name, len(self.sets))
            if loss is None:
                continue  # this on_evaluate call is for another set
            values = {metric_key(name, "perplexity"): perplexity(loss) if math.isfinite(loss) else float("nan")}
            if name in self.plan and model is not None:
                gen_metrics = self._generate_for(model, name)
                values.update({metric_key(name, k): v for k, v in gen_metrics.items()})
            self.last[name] = values
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


def make_eval_callback(cfg, tokenizer, rules, *, log: Callable[[dict], None] | None = None,
                       sets: dict[str, list] | None = None, metrics_path: str | Path | None = None) -> GenerationEvalCallback:
    """The callback for a run config; reads the validation conversations only when generation is configured.

    sets: validation set names -> conversations; default: rebuilt from cfg.data (same split as training).
    """
    if sets is None:
        if cfg.eval.generation:
            sets, _ = load_conversations(cfg.data)
        else:  # perplexity only: the names are enough
            from ..data.sources import validation_sets

            names = list(validation_sets(cfg.data.validation)) or (["validation"] if cfg.data.val_ratio > 0 else [])
            sets = {name: [] for name in names}
    return GenerationEvalCallback(cfg.eval, tokenizer, rules, sets, log=log, metrics_path=metrics_path)


def attach_eval_callback(trainer, cfg, tokenizer, rules) -> GenerationEvalCallback:
    """Create the callback, log through `trainer.log`, and add it to the trainer."""
    cb = make_eval_callback(cfg, tokenizer, rules, log=trainer.log)
    trainer.add_callback(cb)
    return cb
