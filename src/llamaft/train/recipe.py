"""The one training path (LoRA, QLoRA, full) on the HF Trainer, top to bottom: setup → train → save.

    llamaft train configs/llama-3.1-8b-lora.yaml train.max_steps=20        # CLI
    run_dir = train(load_config("configs/llama-3.1-8b-lora.yaml"))          # Python

setup          hardware and run-dir checks → rows read and split → tokenizer → token examples → eval
               names and model checks on the meta device → run dir created (nothing is written
               before every check passed)
build_trainer  base model → adapters → fast path / collator → (optimizer in backward) → Trainer with its callbacks
fit            train (or resume); a NaN/Inf stop or an interrupt writes summary.json, then raises
save           final evaluation → adapter/ or model/ with the tokenizer → summary.json + loss.png + report.md

Output: one progress bar in a terminal, one plain line per logging step in a log (train/progress.py);
library noise is filtered in one place (llamaft/console.py).

Several processes (DDP or FSDP2, train/distributed.py, fsdp.py): rank 0 runs setup's checks and reads the data, the
others receive it; every rank trains; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from ..console import make_console, quiet_libraries
from ..data.pipeline import Datasets, Splits
from ..errors import LlamaftError, TrainingDiverged
from ..eval.plots import plot_losses
from ..eval.report import write_report
from ..model.adapters import count_parameters, save_trained
from ..model.fast import restore_parked
from ..model.finite import first_nonfinite_param
from ..model.from_run import as_named
from ..model.load import quantization_config, resolve_precision
from ..model.tokenizer import load_tokenizer, save_tokenizer
from ..paths import write_text_atomic
from . import distributed
from .callbacks import (MetricsJsonlCallback, attach_eval_callback, eval_scope, json_safe, read_metrics,
                        tensorboard_callbacks, truncate_metrics)
from .checkpoint import clean_incomplete, completed, latest_complete, out_of_memory_message, prepare_run_dir
from .fsdp import full_state_dict, settle_strategy
from .in_backward import in_backward_optimizer
from .portable import save_run_config
from .progress import TrainProgress, find_progress, replace_hf_progress
from .preference import eval_metrics, objective_parts, pick_plan
from .setup import (build_model, check_inputs, check_optimizer, gradient_checkpointing, optimizer_in_backward,
                    place_on_gpu, training_arguments)

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What setup() established; every later step reads it."""

    cfg: Any  # RunConfig
    dir: Path
    resume_from: Path | None  # the checkpoint to continue from (None: a fresh run)
    splits: Splits  # the rows, read and split once (generation metrics reuse the validation ones)
    data: Datasets  # the same rows as token examples
    tokenizer: Any
    rules: Any  # model.tokenizer.TokenRules
    started: float  # time.time() when setup began
    started_from: dict | None = None  # model.name another run: that run, its adapter hash, the base loaded

    @property
    def snapshot(self):
        """The config as config.yaml keeps it: model.name the run the user named, not the base it resolved to."""
        return as_named(self.cfg, self.started_from)

    @property
    def out(self) -> Path:
        """adapter/ (PEFT) or model/ (full weights), each with tokenizer + generation_config."""
        return self.dir / ("model" if self.cfg.model.method == "full" else "adapter")

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def set_names(self) -> list[str]:
        """The validation sets evaluated, in config order."""
        return [n for n, exs in self.data.validation.items() if exs]


@dataclass
class Outcome:
    """How a run ended: what summary.json reports beyond the trainer's own state."""

    status: str  # "completed" | "stopped_nonfinite" | "interrupted" | "failed" (the machine: e.g. a full disk)
    result: Any = None  # HF TrainOutput (None when interrupted)
    final_eval: dict = field(default_factory=dict)  # set -> {"loss", "perplexity", generation metrics}
    stopped: dict | None = None  # stopped_nonfinite / failed: step, reason (+ last finite loss, last good checkpoint)


def train(cfg, *, callbacks: list | None = None, training_args: dict | None = None, data_cache=None) -> Path:
    """Fine-tune as `cfg` says; returns the run directory (see docs/ARCHITECTURE.md for its layout).

    callbacks / training_args: extra HF callbacks and TrainingArguments fields (tests, advanced use).
    data_cache: a directory of rows and token examples keyed by content (data/cache.py; a sweep's trials share one).
    Raises TrainingDiverged (after writing summary.json) when a loss or gradient was not finite.
    """
    quiet_libraries()  # also for Python callers that never went through the CLI
    run = setup(cfg, data_cache)
    trainer, plan, eval_cb = build_trainer(run, callbacks, training_args)
    if distributed.from_main(_already_finished(run, trainer)):
        distributed.close()
        return run.dir
    _start_outputs(run)
    result = fit(run, trainer, plan)
    save(run, trainer, plan, result, eval_cb)
    distributed.close()  # every rank returns once the run directory is complete
    say(f"run saved to {run.dir} (summary.json, report.md)")
    return run.dir


def say(text: str) -> None:
    """One line of the run's own output: never wrapped, never read as rich markup (paths hold [ ]).
    Several processes: rank 0's only."""
    if distributed.is_main():
        make_console().print(text, markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------
# setup: cheap checks first, so config / hardware / data errors never wait for a model load


def setup(cfg, data_cache=None) -> Run:
    """Every check that needs no weights, then the run directory (only now: a bad input never
    leaves an empty run directory behind). Several processes: rank 0 checks and reads, the others
    receive its rows and examples (or its error), then load the tokenizer it has already fetched."""
    started = time.time()
    distributed.init()
    loaded = {}

    def checked_inputs():
        check_hardware(cfg)
        run_dir, resume_from = prepare_run_dir(cfg)
        inputs = check_inputs(cfg, data_cache, say, resume_from and run_dir)  # model.name a run: model/from_run.py
        loaded["tokenizer"] = inputs.tokenizer, inputs.rules
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, resume_from, inputs.splits, inputs.data, inputs.cfg, inputs.started_from

    run_dir, resume_from, splits, data, load_cfg, started_from = distributed.on_main(
        checked_inputs, "checking the config and reading the data")
    tokenizer, rules = loaded.get("tokenizer") or load_tokenizer(load_cfg.model, load_cfg.data)
    return Run(load_cfg, run_dir, resume_from, splits, data, tokenizer, rules, started, started_from)


def check_hardware(cfg) -> None:
    """Everything that needs CUDA/bitsandbytes fails here, before data or models load."""
    if cfg.model.method == "qlora":
        quantization_config(cfg.quantization, cfg.model.method)
    check_optimizer(cfg.train)
    resolve_precision(cfg.train, cfg.model)
    distributed.check(cfg)  # several processes: the batch divides among them


# ---------------------------------------------------------------------------------------------
# the model and the Trainer


def build_trainer(run: Run, callbacks: list | None, training_args: dict | None):
    """(trainer, fast-path plan, eval callback or None): the model with adapters and fast path, the
    Trainer over the examples, metrics.jsonl / TensorBoard / per-set eval metrics attached."""
    cfg = distributed.per_process(run.cfg)  # several processes: each its share of the accumulation
    dtype, bf16, fp16 = resolve_precision(cfg.train, cfg.model)
    # Seed before the adapters are initialised (the Trainer seeds only later): same config, same
    # LoRA init, so reruns and resumed runs start from identical weights.
    set_seed(cfg.train.seed)
    model = build_model(cfg, run.tokenizer, run.rules, dtype, run.started_from)
    strategy, lines = settle_strategy(cfg, model, run.resume_from)  # DDP or FSDP2 (fsdp.py): the plan reads it
    for line in lines:
        say(line)
    if strategy != "fsdp":  # FSDP2 moves each process's shard to its GPU itself: the whole model never goes there
        model = place_on_gpu(cfg, model)
    parts = objective_parts(cfg, run, dtype)  # SFT's datasets, or TRL's preference trainer over our pair ids (preference.py)
    model, collator, plan = pick_plan(cfg, model, run.rules.pad_id, parts.lengths)
    for reason in getattr(plan, "reasons", []):
        say(f"fast path: {reason}")
    eval_sets = parts.eval
    args = training_arguments(
        cfg, run.dir / "checkpoints", bf16=bf16, fp16=fp16, has_eval=bool(eval_sets), cls=parts.args_cls,
        grad_ckpt=gradient_checkpointing(cfg.train, plan), extra={**parts.args, **(training_args or {})}, plan=plan,
        strategy=strategy,
    )
    # The optimizer in the backward is built here, on the model the plan installed; HF builds the LR
    # scheduler on it. None: HF's own optimizer from args.optim.
    optimizer = in_backward_optimizer(model, args) if optimizer_in_backward(plan) else None
    pad = run.rules.pad_id if getattr(plan, "pack_multiple", 0) else None  # packed rows' pad segment: not counted
    trainer = parts.cls(
        model=model,
        args=args,
        optimizers=(optimizer, None),
        train_dataset=parts.train,
        eval_dataset=eval_sets or None,
        data_collator=parts.collator or collator,
        **parts.kwargs,
        # TrainProgress first: it adds tokens/s, step time and memory to the log events the next ones write
        callbacks=[TrainProgress(run.set_names, pad_id=pad), MetricsJsonlCallback(run.metrics_path, run.set_names),
                   *tensorboard_callbacks(run.dir, cfg.train.report_to), *(callbacks or [])],
        on_nonfinite=cfg.train.on_nonfinite,
        max_nonfinite_skips=cfg.train.max_nonfinite_skips,
    )
    replace_hf_progress(trainer)  # no tqdm bars (nested ones for every evaluation) nor printed log dicts
    # Perplexity + generation metrics per validation set at every evaluation, on the rows read in setup.
    # Under FSDP every rank takes part in each forward: every rank generates, rank 0 logs.
    eval_cb = attach_eval_callback(trainer, cfg, run.tokenizer, run.rules, run.splits.validation,
                                   every_rank=strategy == "fsdp") if eval_sets else None
    if args.world_size > 1:
        trainer.add_callback(distributed.wait_for_main())  # the others wait while rank 0 generates
        say(distributed.batch_line(args))
    return trainer, plan, eval_cb


# ---------------------------------------------------------------------------------------------
# train


def _already_finished(run: Run, trainer) -> bool:
    """A resumed run at the end of its schedule: True when its outputs exist (change nothing)."""
    if run.resume_from is None or trainer.steps_left(run.resume_from) > 0:
        return False
    if completed(run.dir) and run.out.is_dir() and any(run.out.glob("*.safetensors")):
        # HF would train one more step and every output would be rewritten: change nothing.
        say(f"nothing to do: {run.dir} already finished its schedule at {run.resume_from.name}; "
            "raise train.max_steps or train.epochs to train further")
        return True
    say(f"{run.resume_from.name} is the end of the schedule: writing the run's final outputs from it")
    return False


def _start_outputs(run: Run) -> None:
    """Only now is the run directory written to (by rank 0): a run that is already complete stays untouched."""
    if not distributed.is_main():
        return
    save_run_config(run.snapshot, run.dir, run.splits)  # paths that hold from anywhere; eval data copied in (portable.py)
    if run.resume_from is not None:
        truncate_metrics(run.metrics_path, _step_of(run.resume_from))
        say(f"resuming from {run.resume_from}")
    else:
        run.metrics_path.unlink(missing_ok=True)


def fit(run: Run, trainer, plan):
    """trainer.train (a resume restores optimizer, scheduler, RNG and data position from the
    checkpoint); returns HF's TrainOutput. An interrupt or a non-finite stop writes summary.json,
    then raises (KeyboardInterrupt / TrainingDiverged)."""
    try:
        try:
            result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        except torch.OutOfMemoryError as err:
            raise LlamaftError(out_of_memory_message(err, plan, trainer.state.global_step)) from None
    except KeyboardInterrupt:
        # Checkpoints are atomic, so whatever is in checkpoints/ is safe to continue from; a save the
        # interrupt cut short (even between its staging and its publish) leaves nothing behind.
        _close_progress_bar(trainer)
        try:
            if distributed.is_main():
                clean_incomplete(run.dir / "checkpoints")
            finish(run, trainer, plan, Outcome("interrupted"))
        except Exception as err:  # never let bookkeeping hide the interrupt
            log.warning("could not write summary.json for the interrupted run: %s", err)
        say(f"interrupted; continue with: llamaft train {run.dir / 'config.yaml'} train.resume=true{distributed.nproc_flag()}")
        raise
    except LlamaftError as err:  # the machine failed the run (e.g. a checkpoint on a full disk)
        _close_progress_bar(trainer)
        try:
            finish(run, trainer, plan, Outcome("failed", stopped={"step": trainer.state.global_step, "reason": str(err)}))
        except Exception as summary_err:  # the same full disk may refuse the summary too
            log.warning("could not write summary.json for the failed run: %s", summary_err)
        raise
    guard = trainer.nonfinite_guard
    if guard.stopped is None and (bad := first_nonfinite_param(trainer.model, trainable_only=True)):
        guard.stop(trainer.state.global_step, f"weight {bad} is not finite")  # no final adapter/model from NaN
    if guard.stopped is not None:
        last_good = latest_complete(run.dir / "checkpoints")
        finish(run, trainer, plan, Outcome("stopped_nonfinite", result, stopped=guard.stopped.as_dict(last_good)))
        raise distributed.once(TrainingDiverged(guard.stopped.message(last_good)))  # decided by all ranks alike
    return result


# ---------------------------------------------------------------------------------------------
# save


def save(run: Run, trainer, plan, result, eval_cb) -> None:
    """Final evaluation, the trained weights with the tokenizer, then summary.json + loss.png."""
    restore_parked(trainer.model)  # fast.cpu_lm_head: the head back on the GPU for the final eval and saving
    final_eval = final_evaluation(run, trainer, eval_cb)  # every rank: HF evaluates on all of them
    # FSDP: the weights are shards; every rank takes part in gathering them whole for rank 0
    state = full_state_dict(trainer) if trainer.is_fsdp_enabled else None
    if distributed.is_main():
        save_trained(trainer.model, run.out, state)
        save_tokenizer(run.tokenizer, run.rules, run.out)
    finish(run, trainer, plan, Outcome("completed", result, final_eval))


def _close_progress_bar(trainer) -> None:
    """End our progress bar (HF ends training callbacks only on a normal end), so that the one-line
    error or the interrupt note starts on a line of its own, below the bar."""
    progress = find_progress(trainer)
    if progress is not None:
        progress.close()


def final_evaluation(run: Run, trainer, eval_cb) -> dict:
    """{set: {"loss", + perplexity and generation metrics}} of every named set at the last step."""
    if eval_cb is None:
        return {}
    metrics = _last_step_eval(trainer, run.set_names) or trainer.evaluate()
    final = {n: {"loss": metrics.get(f"eval_{n}_loss"), **pref} for n, pref in eval_metrics(metrics, run.set_names).items()}
    for n in run.set_names:
        final[n].update({k.rsplit("/", 1)[-1]: v for k, v in eval_cb.last.get(n, {}).items()})
    return final


def _last_step_eval(trainer, set_names) -> dict | None:
    """The periodic evaluation at the very last step, when there was one: evaluating (and generating)
    the same weights twice costs minutes on CPU and gives the same numbers."""
    step = trainer.state.global_step
    found = {}
    for entry in trainer.state.log_history:
        if entry.get("step") == step:
            found.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return found if all(f"eval_{n}_loss" in found for n in set_names) else None


def finish(run: Run, trainer, plan, outcome: Outcome) -> None:
    """summary.json + loss.png + report.md for every way a run ends (completed, stopped, interrupted;
    a failed run, whose disk refused a write, gets the summary only). Rank 0 only."""
    _close_progress_bar(trainer)  # the final evaluation's lines are out; the token hook is off
    if not distributed.is_main():
        return
    rows = read_metrics(run.metrics_path)
    plot_losses(rows, run.set_names, run.dir / "loss.png", title=f"{run.snapshot.model.name} ({run.cfg.model.method})")
    summary = run_summary(run, trainer, plan, outcome, rows)
    write_text_atomic(run.dir / "summary.json", json.dumps(json_safe(summary), indent=2, allow_nan=False))
    for cb in trainer.callback_handler.callbacks:
        if getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.close()  # flush the final evaluation's events
    if outcome.status != "failed":
        _write_report(run)


def _write_report(run: Run) -> None:
    """RUN/report.md + RUN/plots/ from what the run wrote; a report that cannot be written never hides
    how the run ended (summary.json is already there)."""
    try:
        write_report(run.dir)
    except Exception as err:  # noqa: BLE001 - the weights and summary are saved; the page is a view of them
        log.warning("could not write %s: %s", run.dir / "report.md", err)


def run_summary(run: Run, trainer, plan, outcome: Outcome, rows: list[dict]) -> dict:
    """summary.json's content: how the run ended, then its facts (see docs/ARCHITECTURE.md)."""
    cfg, state = run.cfg, trainer.state
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    trainable, total = count_parameters(trainer.model)
    steps_run = state.global_step - (_step_of(run.resume_from) if run.resume_from else 0)
    return {
        "status": outcome.status,
        **({"stopped": outcome.stopped} if outcome.stopped else {}),
        "model": run.snapshot.model.name,
        "method": cfg.model.method,
        **({"started_from": run.started_from} if run.started_from else {}),
        "train_loss": train_losses[-1] if train_losses else None,  # the last logged value (null: not finite)
        # mean over this process's steps (HF's train_loss); null when none ran or one was not finite
        "train_loss_mean": outcome.result.training_loss if outcome.result is not None and steps_run > 0 else None,
        "nonfinite_skipped_steps": list(trainer.nonfinite_guard.skipped),
        "eval": outcome.final_eval,
        # how many rows each number in `eval` stands for (generation: a sample; `llamaft eval`: every row)
        **({"eval_during_training": eval_scope(cfg.eval, {n: len(run.splits.validation.get(n, [])) for n in run.set_names},
                                               {n: len(run.data.validation[n]) for n in run.set_names},
                                               objective=cfg.train.objective)}
           if run.set_names else {}),
        "steps": state.global_step,
        "epochs": state.epoch,
        "runtime_s": round(time.time() - run.started, 2),
        "trainable_params": trainable,
        "total_params": total,
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "fast_path": list(getattr(plan, "reasons", [])),
        "batch": distributed.batch_summary(trainer.args),  # sequences per optimizer step
        **({"optimizer_in_backward": True} if optimizer_in_backward(plan) else {}),
        "throughput": progress.throughput() if (progress := find_progress(trainer)) else None,
        "data": run.data.stats,
    }


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])
