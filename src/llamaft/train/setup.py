"""Our `train` section → HF TrainingArguments, and the pieces the Trainer is built from.

Our config names what users choose; this file is the one place that knows HF's 200 field names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.cache import cached_datasets, cached_splits
from ..data.pipeline import Datasets, Splits
from ..data.preference import check_objective_formats
from ..errors import LlamaftError
from ..eval.generation import check_generation_sets
from ..model.adapters import apply_adapters
from ..model.from_run import check_resumed, continued_adapter, frozen_adapter, start_from_run
from ..model.fast import apply_fast_path, choose_plan, configure_allocator, make_collator
from ..model.load import cuda_available, load_base, require_bitsandbytes
from ..model.preflight import check_model
from ..model.tokenizer import load_tokenizer
from . import distributed
from .fsdp import trainer_arguments

_OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
               "adamw_torch_8bit": "adamw_torch_8bit"}  # the last: torchao's AdamW8bit (DTensor-aware: FSDP2)


class ListDataset(torch.utils.data.Dataset):
    """A list of Examples as a map-style dataset: the collator turns them into tensors."""

    def __init__(self, items: list):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        return [len(ex["input_ids"] if isinstance(ex, dict) else ex.input_ids) for ex in self.items]

    def __getitem__(self, i: int) -> dict:
        ex = self.items[i]
        if isinstance(ex, dict):
            return ex
        return {"input_ids": list(ex.input_ids), "labels": list(ex.labels)}


def require_torchao(what: str) -> None:
    """torchao (its low-bit optimizers, through HF's optim name) is optional: llamaft[gpu] brings it."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise LlamaftError(f"{what} needs torchao: run `pip install torchao` (or `pip install llamaft[gpu]`); "
                           "or use train.optimizer=adamw_torch")


def check_optimizer(train_cfg) -> str:
    """HF optim name; 8-bit optimizers need CUDA + bitsandbytes, or torchao (checked before any model loads)."""
    if train_cfg.optimizer == "adamw_torch_8bit":
        require_torchao("train.optimizer=adamw_torch_8bit")
    elif train_cfg.optimizer != "adamw_torch":
        require_bitsandbytes(f"train.optimizer={train_cfg.optimizer}", "use train.optimizer=adamw_torch on CPU")
    return _OPTIMIZERS[train_cfg.optimizer]


def _every(value: float | int) -> tuple[str, float | int]:
    """(strategy, steps): 0 → 'no'; 0 < x < 1 → ratio of the run (HF reads floats < 1 as ratios); else steps."""
    if value == 0:
        return "no", 1
    if 0 < value < 1:
        return "steps", float(value)
    return "steps", int(value)


def warmup(train_cfg) -> int | float:
    """warmup_steps wins when > 0; else warmup_ratio (HF 5 takes a float < 1 in warmup_steps as a ratio)."""
    if train_cfg.warmup_steps > 0:
        return int(train_cfg.warmup_steps)
    return float(train_cfg.warmup_ratio)


def scheduler(train_cfg) -> str:
    # HF's "constant" ignores warm-up; "constant_with_warmup" with 0 warm-up steps is the same as constant.
    return {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[train_cfg.scheduler]


@dataclass(frozen=True)
class Steps:
    """How the Trainer steps: the one resolution of the user's `train` section and the fast-path plan."""

    micro_batch_size: int         # per device, per forward
    gradient_accumulation: int    # micro-batches per optimizer step
    gradient_checkpointing: bool  # HF's; False when the fast path checkpoints the layers itself
    optim: str                    # HF's optimizer name


def resolve_steps(train_cfg, plan=None) -> Steps:
    """The plan's choices where it made them (regrouped micro-batches, torch's fused AdamW, whose
    checkpointing), else the config's; 8-bit optimizers need CUDA + bitsandbytes (LlamaftError)."""
    micro = getattr(plan, "micro_batch_size", None) or train_cfg.micro_batch_size
    accum = getattr(plan, "gradient_accumulation", None) or train_cfg.gradient_accumulation
    optim = check_optimizer(train_cfg)
    if optim == "adamw_torch" and getattr(plan, "fused_optimizer", False) and cuda_available():
        optim = "adamw_torch_fused"  # same update, one kernel per step instead of one per tensor
    if optim == "paged_adamw_8bit" and getattr(plan, "unpaged_optimizer", False):
        optim = "adamw_bnb_8bit"  # same update; its states inside torch's allocator, within the memory cap
    return Steps(micro, accum, gradient_checkpointing(train_cfg, plan), optim)


def gradient_checkpointing(train_cfg, plan=None) -> bool:
    """HF's checkpointing on/off (part of `resolve_steps`): the plan's when there is one ("hf"; its
    own layer checkpointing, model/fast/recompute.py, keeps HF's off), else the config's, auto =
    on for GPUs and off on CPU."""
    if plan is not None:
        return plan.checkpointing == "hf"
    if train_cfg.gradient_checkpointing != "auto":
        return train_cfg.gradient_checkpointing == "on"
    return cuda_available()


def optimizer_in_backward(plan) -> bool:
    """Does the plan step each parameter inside the backward (train/in_backward.py)?"""
    return bool(getattr(plan, "optimizer_in_backward", False))


def training_arguments(cfg, ckpt_dir: Path, *, bf16: bool, fp16: bool, has_eval: bool, grad_ckpt: bool | None = None,
                       extra: dict | None = None, plan=None, cls=None, strategy: str = "single"):
    """Build TrainingArguments (or `cls`: TRL's DPOConfig / ORPOConfig); `extra`: fields we do not expose.
    Batch shape, optimizer and HF's checkpointing come from `resolve_steps(cfg.train, plan)`;
    `grad_ckpt` overrides the checkpointing flag when given; `strategy` "fsdp" adds FSDP2's fields (train/fsdp.py)."""
    from transformers import TrainingArguments

    t = cfg.train
    steps = resolve_steps(t, plan)
    grad_ckpt = steps.gradient_checkpointing if grad_ckpt is None else grad_ckpt
    eval_strategy, eval_steps = _every(t.eval_every) if has_eval else ("no", 1)
    save_strategy, save_steps = _every(t.save_every)
    _, logging_steps = _every(t.logging_every or 1)
    cuda = cuda_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(ckpt_dir),
        num_train_epochs=float(t.epochs),
        max_steps=int(t.max_steps) if t.max_steps else -1,  # HF: -1 = train for num_train_epochs
        learning_rate=t.learning_rate,
        lr_scheduler_type=scheduler(t),
        warmup_steps=warmup(t),
        per_device_train_batch_size=steps.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=steps.gradient_accumulation,
        optim=steps.optim,
        weight_decay=t.weight_decay,
        # clipping needs the whole gradient's norm before any update: impossible when each parameter
        # steps inside the backward (the plan's reason line says so)
        max_grad_norm=0.0 if optimizer_in_backward(plan) else t.max_grad_norm,
        gradient_checkpointing=grad_ckpt,
        # non-reentrant: works with frozen embeddings (LoRA) without forcing input grads
        gradient_checkpointing_kwargs={"use_reentrant": False} if grad_ckpt else None,
        bf16=bf16,
        fp16=fp16,
        seed=t.seed,
        data_seed=t.seed,  # same shuffle order on resume and across methods
        eval_strategy=eval_strategy,
        eval_steps=eval_steps if eval_strategy != "no" else None,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        logging_strategy="steps",
        logging_steps=logging_steps,
        # HF would log a NaN/Inf loss as the mean of earlier ones: a diverged run must look diverged
        # (train/nonfinite.py stops or skips such steps).
        logging_nan_inf_filter=False,
        # tensorboard is attached by the recipe with RUN/tb as its directory (HF 5 dropped logging_dir)
        report_to=[r for r in t.report_to if r not in ("tensorboard", "none")] or "none",
        remove_unused_columns=False,  # our collator builds the tensors from Examples
        label_names=["labels"],  # PEFT wraps forward(**kwargs): HF cannot infer it, and eval needs it for loss
        dataloader_num_workers=0,  # tokenised lists in memory: workers only add fork cost on small CPUs
        dataloader_pin_memory=cuda,
        use_cpu=not cuda,
        # DDP: every trainable weight takes part in every forward (HF would search for unused ones each
        # step: a PEFT model is no PreTrainedModel to ask)
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    kwargs.update({**trainer_arguments(cfg, strategy), **(extra or {})})  # FSDP2's fields (fsdp.py), then the caller's
    return (cls or TrainingArguments)(**kwargs)


def pick_collator_and_plan(cfg, model, pad_id: int, lengths: list[int] | None = None) -> tuple[Any, Callable, Any]:
    """(model, collator, plan): the fast-path plan for this model, installed, and its batches
    (packed rows or right padding; on CPU the plan is all off). `lengths`: the training examples'
    token counts (the plan sizes micro-batches with them)."""
    plan = choose_plan(cfg, model, lengths)
    return apply_fast_path(model, plan), make_collator(plan, pad_id), plan


def build_model(cfg, tokenizer, rules, dtype, started_from: dict | None = None):
    """The base model with its adapters (or all weights trainable), in CPU memory unless bitsandbytes placed it;
    model.from_run: continue: the started-from run's adapter, trainable; stack: that adapter frozen under a
    new one (model/from_run.py)."""
    if cfg.fast.enabled:
        configure_allocator()  # before the weights land: every segment expandable (model/fast/memory.py)
    # FSDP + QLoRA: the 4-bit base is loaded in a storage FSDP can shard (model/load.bnb_arguments)
    sharded = distributed.world().size > 1 and cfg.distributed.strategy == "fsdp"
    model = load_base(cfg.model, cfg.quantization, rules, tokenizer, dtype, sharded=sharded)
    return apply_adapters(model, cfg.model, cfg.lora, continued_adapter(started_from), frozen_adapter(started_from))


def place_on_gpu(cfg, model):
    """The model on this process's GPU (not under FSDP2, which moves each shard there itself)."""
    if torch.cuda.is_available() and cfg.model.method != "qlora":
        # On the GPU before the fast-path plan is chosen: the plan reads the model's device (the
        # Trainer would move it only later). qlora bases are placed by bitsandbytes already.
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    return model


@dataclass
class Inputs:
    """What check_inputs established (a sweep runs the same before its first trial)."""

    splits: Splits
    tokenizer: Any
    rules: Any
    data: Datasets
    cfg: Any  # the config to load with: model.name a run directory → the base it names (model/from_run.py)
    started_from: dict | None = None  # where the run starts when model.name is a run (summary.json)


def check_inputs(cfg, data_cache=None, say=None, resumed: Path | None = None) -> Inputs:
    """Rows, tokenizer and token examples after every data and model check that needs no weights;
    model.name a run directory: its base (a LoRA run's adapter merged once, cached) after the data
    checks, before the tokenizer. `resumed`: the run directory a resumed run continues."""
    splits = cached_splits(cfg.data, data_cache)  # bad rows fail here, in seconds, before any tokenizer/model load
    check_objective_formats(cfg.train.objective, splits.formats)  # preference rows for dpo / orpo / simpo, SFT rows for sft
    model_cfg, started = start_from_run(cfg.model, say)
    if resumed is not None:
        check_resumed(started, resumed)  # model.from_run: stack: the frozen adapter as the checkpoint trained on it
    cfg = cfg if started is None else cfg.model_copy(update={"model": model_cfg})
    tokenizer, rules = load_tokenizer(cfg.model, cfg.data)
    data = cached_datasets(cfg.data, tokenizer, rules, splits, data_cache)
    if not data.train:
        raise LlamaftError("data.train: no training examples left after filtering; check data.max_seq_length")
    check_generation_sets(cfg.eval, list(data.validation))  # eval.generation names and metrics
    check_model(cfg.model, cfg.lora, tokenizer, rules)  # source, vocabulary, lora.target_modules on the meta device
    return Inputs(splits, tokenizer, rules, data, cfg, started)
