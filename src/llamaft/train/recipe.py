"""The one training path (LoRA, QLoRA, full) on the HF Trainer, top to bottom.

    llamaft train configs/llama-3.1-8b-lora.yaml train.max_steps=20        # CLI
    run_dir = train(load_config("configs/llama-3.1-8b-lora.yaml"))          # Python

setup (hardware, run-dir checks) → tokenizer + data → eval names + model checks on the meta device →
run dir created (nothing is written before every check passed) → base model
→ adapters → fast path / collator → Trainer → train (or resume) → final eval → save → summary + plot.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

import torch
from transformers import set_seed

from ..config import save_config
from ..errors import LlamaftError, TrainingDiverged
from ..model.adapters import apply_adapters, count_parameters, save_trained
from ..model.finite import first_nonfinite_param
from ..model.load import load_base, quantization_config, resolve_precision
from ..paths import check_output_dir
from .callbacks import MetricsJsonlCallback, json_safe, read_metrics, truncate_metrics
from .checkpoint import AtomicCheckpointTrainer, clean_incomplete, latest_complete, resolve_resume
from .plots import plot_losses
from .setup import ListDataset, check_optimizer, gradient_checkpointing, pick_collator_and_plan, training_arguments

log = logging.getLogger(__name__)


# The data/tokenizer layers are imported late: they are separate modules with their own owners, and
# tests swap them for tiny stand-ins.
def load_tokenizer(model_cfg, data_cfg):
    from ..model.tokenizer import load_tokenizer as _load

    return _load(model_cfg, data_cfg)


def save_tokenizer(tokenizer, rules, out_dir) -> None:
    from ..model.tokenizer import save_tokenizer as _save

    _save(tokenizer, rules, out_dir)


def split_conversations(data_cfg):
    from ..data.pipeline import split_conversations as _split

    return _split(data_cfg)


def build_datasets(data_cfg, tokenizer, rules, splits=None):
    from ..data.pipeline import build_datasets as _build

    return _build(data_cfg, tokenizer, rules, splits=splits)


def prepare_run_dir(cfg) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from); refuses to mix a fresh run into an old one.
    Creates nothing: train() makes the directory only once every check has passed."""
    run_dir = check_output_dir(cfg.train.output_dir, "train.output_dir")  # a file, under a file, read-only: one line
    ckpt_dir = run_dir / "checkpoints"
    clean_incomplete(ckpt_dir)
    resume_from = resolve_resume(cfg.train.resume, ckpt_dir)
    # A run stopped or interrupted before its first checkpoint left only a summary: start it afresh.
    summary = read_summary(run_dir)
    ended = summary is not None and summary.get("status", "completed") == "completed"
    if resume_from is None and (ended or any(ckpt_dir.glob("checkpoint-*"))):
        raise LlamaftError(
            f"train.output_dir={run_dir} already holds a run; set train.resume=true to continue it "
            "or choose another train.output_dir"
        )
    return run_dir, resume_from


def check_before_model(cfg, tokenizer, rules, data) -> None:
    """The checks left that need no weights: eval.generation set and metric names against the
    validation sets; the model's source, vocabulary and lora.target_modules on the meta device."""
    from ..eval.callback import check_generation_sets
    from ..model.preflight import check_model

    check_generation_sets(cfg.eval, list(data.validation))
    check_model(cfg.model, cfg.lora, tokenizer, rules)


def check_hardware(cfg) -> None:
    """Everything that needs CUDA/bitsandbytes fails here, before data or models load."""
    if cfg.model.method == "qlora":
        quantization_config(cfg.quantization, cfg.model.method)
    check_optimizer(cfg.train)
    resolve_precision(cfg.train, cfg.model)


def build_model(cfg, tokenizer, rules, dtype):
    model = load_base(cfg.model, cfg.quantization, rules, tokenizer, dtype)
    model = apply_adapters(model, cfg.model, cfg.lora)
    if torch.cuda.is_available() and cfg.model.method != "qlora":
        # On the GPU before the fast-path plan is chosen: the plan reads the model's device (the
        # Trainer would move it only later). qlora bases are placed by bitsandbytes already.
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    return model


def _tensorboard(run_dir: Path, report_to: list[str]) -> list:
    if "tensorboard" not in report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    cb = TensorBoardCallback()
    # HF 5 has no logging_dir argument; the callback (re)opens its writer here, also for the final
    # evaluate() after on_train_end closed it.
    cb.logging_dir = str(run_dir / "tb")
    return [cb]


def train(cfg, *, callbacks: list | None = None, training_args: dict | None = None) -> Path:
    """Fine-tune as `cfg` says; returns the run directory (see docs/ARCHITECTURE.md for its layout).

    callbacks / training_args: extra HF callbacks and TrainingArguments fields (tests, advanced use).
    Raises TrainingDiverged (after writing summary.json) when a loss or gradient was not finite.
    """
    started = time.time()
    # -- setup: cheap checks first, so config/hardware/data errors never wait for a model load
    check_hardware(cfg)
    run_dir, resume_from = prepare_run_dir(cfg)
    splits = split_conversations(cfg.data)  # bad rows fail here, in seconds, before any tokenizer/model load
    tokenizer, rules = load_tokenizer(cfg.model, cfg.data)
    data = build_datasets(cfg.data, tokenizer, rules, splits=splits)
    if not data.train:
        raise LlamaftError("data.train: no training examples left after filtering; check data.max_seq_length")
    check_before_model(cfg, tokenizer, rules, data)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a bad input never leaves an empty run directory

    # -- model
    dtype, bf16, fp16 = resolve_precision(cfg.train, cfg.model)
    # Seed before the adapters are initialised (the Trainer seeds only later): same config, same
    # LoRA init, so reruns and resumed runs start from identical weights.
    set_seed(cfg.train.seed)
    model = build_model(cfg, tokenizer, rules, dtype)
    train_set = ListDataset(data.train)
    model, collator, plan = pick_collator_and_plan(cfg, model, rules.pad_id, train_set.lengths())
    for reason in getattr(plan, "reasons", []):
        print(f"fast path: {reason}")

    # -- Trainer
    set_names = [n for n, exs in data.validation.items() if exs]
    eval_sets = {n: ListDataset(data.validation[n]) for n in set_names}
    args = training_arguments(
        cfg, run_dir / "checkpoints", bf16=bf16, fp16=fp16, has_eval=bool(eval_sets),
        grad_ckpt=gradient_checkpointing(cfg.train, plan), extra=training_args, plan=plan,
    )
    metrics_path = run_dir / "metrics.jsonl"
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets or None,
        data_collator=collator,
        callbacks=[MetricsJsonlCallback(metrics_path, set_names), *_tensorboard(run_dir, cfg.train.report_to), *(callbacks or [])],
        on_nonfinite=cfg.train.on_nonfinite,
        max_nonfinite_skips=cfg.train.max_nonfinite_skips,
    )
    if resume_from is not None and trainer.steps_left(resume_from) <= 0:
        out = run_dir / ("model" if cfg.model.method == "full" else "adapter")
        if run_finished(run_dir, out):
            # HF would train one more step and every output would be rewritten: change nothing.
            print(f"nothing to do: {run_dir} already finished its schedule at {resume_from.name}; "
                  "raise train.max_steps or train.epochs to train further")
            return run_dir
        print(f"{resume_from.name} is the end of the schedule: writing the run's final outputs from it")

    # Only now is the run directory written to: a run that is already complete stays untouched.
    save_config(cfg, run_dir / "config.yaml")
    if resume_from is not None:
        truncate_metrics(metrics_path, _step_of(resume_from))
        print(f"resuming from {resume_from}")
    else:
        metrics_path.unlink(missing_ok=True)

    # Generation metrics per validation set (eval.generation) at every evaluation, logged with the loss.
    from ..eval.callback import attach_eval_callback

    eval_cb = attach_eval_callback(trainer, cfg, tokenizer, rules) if eval_sets else None
    finish = partial(_finish, run_dir, cfg, trainer, data, plan, set_names, started=started, resume_from=resume_from)

    # -- train (HF restores optimizer, scheduler, RNG and data position from the checkpoint)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        # Checkpoints are atomic, so whatever is in checkpoints/ is safe to continue from.
        try:
            finish(status="interrupted")
        except Exception as err:  # never let bookkeeping hide the interrupt
            log.warning("could not write summary.json for the interrupted run: %s", err)
        print(f"\ninterrupted; continue with: llamaft train {run_dir / 'config.yaml'} train.resume=true")
        raise
    guard = trainer.nonfinite_guard
    if guard.stopped is None and (bad := first_nonfinite_param(trainer.model, trainable_only=True)):
        guard.stop(trainer.state.global_step, f"weight {bad} is not finite")  # no final adapter/model from NaN
    if guard.stopped is not None:
        last_good = latest_complete(run_dir / "checkpoints")
        finish(status="stopped_nonfinite", result=result, stopped=guard.stopped.as_dict(last_good))
        raise TrainingDiverged(guard.stopped.message(last_good))
    from ..model.fast import restore_parked

    restore_parked(model)  # fast.cpu_lm_head: the head back on the GPU for the final eval and saving

    # -- final evaluation of every named set, logged at the last step like the periodic ones
    final_eval = {}
    if eval_sets:
        metrics = _last_step_eval(trainer, set_names) or trainer.evaluate()
        final_eval = {n: {"loss": metrics.get(f"eval_{n}_loss")} for n in set_names}
        for n in set_names:  # + perplexity and generation metrics of that final evaluation
            final_eval[n].update({k.rsplit("/", 1)[-1]: v for k, v in eval_cb.last.get(n, {}).items()})

    # -- save: adapter/ (PEFT) or model/ (full weights), each with tokenizer + generation_config
    out = run_dir / ("model" if cfg.model.method == "full" else "adapter")
    save_trained(trainer.model, out)
    save_tokenizer(tokenizer, rules, out)

    finish(status="completed", result=result, final_eval=final_eval)
    print(f"run saved to {run_dir}")
    return run_dir


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_finished(run_dir: Path, out: Path) -> bool:
    """Did this run write its final outputs? (Summaries from before `status` existed were only
    written by completed runs.)"""
    summary = read_summary(run_dir)
    done = summary is not None and summary.get("status", "completed") == "completed"
    return done and out.is_dir() and any(out.glob("*.safetensors"))


def _finish(run_dir, cfg, trainer, data, plan, set_names, *, started, resume_from, status,
            result=None, final_eval=None, stopped=None) -> None:
    """summary.json + loss.png for every way a run ends (completed, stopped, interrupted)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_losses(rows, set_names, run_dir / "loss.png", title=f"{cfg.model.name} ({cfg.model.method})")
    summary = _summary(cfg, trainer, result, rows, final_eval or {}, data, resume_from, time.time() - started, plan)
    summary = {"status": status, **({"stopped": stopped} if stopped else {}), **summary}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False), encoding="utf-8")
    tmp.replace(run_dir / "summary.json")
    for cb in trainer.callback_handler.callbacks:
        if getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.close()  # flush the final evaluation's events


def _last_step_eval(trainer, set_names) -> dict | None:
    """The periodic evaluation at the very last step, when there was one: evaluating (and generating)
    the same weights twice costs minutes on CPU and gives the same numbers."""
    step = trainer.state.global_step
    found = {}
    for entry in trainer.state.log_history:
        if entry.get("step") == step:
            found.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return found if all(f"eval_{n}_loss" in found for n in set_names) else None


def _summary(cfg, trainer, result, rows, final_eval, data, resume_from, runtime, plan) -> dict:
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    trainable, total = count_parameters(trainer.model)
    steps_run = trainer.state.global_step - (_step_of(resume_from) if resume_from else 0)
    return {
        "model": cfg.model.name,
        "method": cfg.model.method,
        "train_loss": train_losses[-1] if train_losses else None,  # the last logged value (null: not finite)
        # mean over this process's steps (HF's train_loss); null when none ran or one was not finite
        "train_loss_mean": result.training_loss if result is not None and steps_run > 0 else None,
        "nonfinite_skipped_steps": list(trainer.nonfinite_guard.skipped),
        "eval": final_eval,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "runtime_s": round(runtime, 2),
        "trainable_params": trainable,
        "total_params": total,
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        "resumed_from": str(resume_from) if resume_from else None,
        "fast_path": list(getattr(plan, "reasons", [])),
        "data": data.stats,
    }
