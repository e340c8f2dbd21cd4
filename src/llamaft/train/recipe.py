"""The one training path (LoRA, QLoRA, full) on the HF Trainer, top to bottom.

    llamaft train configs/demo.yaml train.max_steps=20        # CLI
    run_dir = train(load_config("configs/demo.yaml"))          # Python

setup (run dir, hardware checks) → tokenizer + data (validated before any model loads) → base model
→ adapters → fast path / collator → Trainer → train (or resume) → final eval → save → summary + plot.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import set_seed

from ..config import save_config
from ..errors import LlamaftError
from ..model.adapters import apply_adapters, count_parameters, save_trained
from ..model.load import load_base, quantization_config, resolve_precision
from ..paths import check_output_dir
from .callbacks import MetricsJsonlCallback, read_metrics, truncate_metrics
from .checkpoint import AtomicCheckpointTrainer, clean_incomplete, resolve_resume
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
    """(run dir, checkpoint to resume from); refuses to mix a fresh run into an old one."""
    run_dir = check_output_dir(cfg.train.output_dir, "train.output_dir")  # a file, under a file, read-only: one line
    ckpt_dir = run_dir / "checkpoints"
    clean_incomplete(ckpt_dir)
    resume_from = resolve_resume(cfg.train.resume, ckpt_dir)
    if resume_from is None and ((run_dir / "summary.json").exists() or any(ckpt_dir.glob("checkpoint-*"))):
        raise LlamaftError(
            f"train.output_dir={run_dir} already holds a run; set train.resume=true to continue it "
            "or choose another train.output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, resume_from


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
    save_config(cfg, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:
        truncate_metrics(metrics_path, int(resume_from.name.split("-")[-1]))
        print(f"resuming from {resume_from}")
    else:
        metrics_path.unlink(missing_ok=True)

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
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets or None,
        data_collator=collator,
        callbacks=[MetricsJsonlCallback(metrics_path, set_names), *_tensorboard(run_dir, cfg.train.report_to), *(callbacks or [])],
    )

    # Generation metrics per validation set (eval.generation) at every evaluation, logged with the loss.
    from ..eval.callback import attach_eval_callback

    eval_cb = attach_eval_callback(trainer, cfg, tokenizer, rules) if eval_sets else None

    # -- train (HF restores optimizer, scheduler, RNG and data position from the checkpoint)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        # Checkpoints are atomic, so whatever is in checkpoints/ is safe to continue from.
        print(f"\ninterrupted; continue with: llamaft train {run_dir / 'config.yaml'} train.resume=true")
        raise
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

    rows = read_metrics(metrics_path)
    plot_losses(rows, set_names, run_dir / "loss.png", title=f"{cfg.model.name} ({cfg.model.method})")
    summary = _summary(cfg, trainer, result, rows, final_eval, data, resume_from, time.time() - started, plan)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    for cb in trainer.callback_handler.callbacks:
        if getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.close()  # flush the final evaluation's events
    print(f"run saved to {run_dir}")
    return run_dir


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
    train_losses = [r["train/loss"] for r in rows if r.get("train/loss") is not None]
    trainable, total = count_parameters(trainer.model)
    return {
        "model": cfg.model.name,
        "method": cfg.model.method,
        "train_loss": train_losses[-1] if train_losses else None,  # the last logged value
        "train_loss_mean": result.training_loss,  # mean over this process's steps (HF's train_loss)
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
