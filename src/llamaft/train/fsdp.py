"""Which strategy several processes train with (DDP or FSDP2), and FSDP2 as the HF Trainer runs it.

    strategy, why = resolve_strategy(cfg, model)   # "single" | "ddp" | "fsdp", and the plan's line
    TrainingArguments(..., **trainer_arguments(cfg, strategy))

FSDP2 is accelerate's (`fully_shard` on every decoder layer, the embeddings and the head, through the
HF Trainer's `fsdp` / `fsdp_config`, version 2): nothing of it is ours but the mapping from our
`distributed.fsdp` section and the rules below.

- auto: DDP when one replica fits a GPU by the fast path's memory estimate with every layer
  checkpointed (model/fast/memory.py, the least a replica can need), else FSDP2; DDP on CPU (host
  memory is not the limit a GPU is). Rank 0's decision is every rank's.
- checkpoints hold the whole adapter / model: `FULL_STATE_DICT`, gathered by every rank and written by
  rank 0 (HF Trainer + FSDP once saved only rank 0's shard of a LoRA adapter); the optimizer state is
  gathered the same way (accelerate's optimizer.bin), so a checkpoint does not depend on the process
  count... except that HF resumes an FSDP checkpoint only under FSDP (`resume_check`).
- hybrid: shard within a machine, replicate across machines (accelerate's ParallelismConfig
  dp_replicate x dp_shard); on one machine it is full sharding, and the plan says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from . import distributed

FSDP_MODEL_FILE = "pytorch_model_fsdp.bin"  # accelerate's FULL_STATE_DICT model file in a checkpoint


def resolve_strategy(cfg, model) -> tuple[str, str | None]:
    """("single" | "ddp" | "fsdp", reason line or None) for this run, the same on every rank."""
    if distributed.world().size == 1:
        return "single", None
    chosen = cfg.distributed.strategy
    if chosen != "auto":
        return chosen, f"strategy: {chosen} (distributed.strategy={chosen})"
    return distributed.from_main(_auto(cfg, model))


def settle_strategy(cfg, model, resume_from: Path | None) -> tuple[str, list[str]]:
    """(strategy, lines for the run's output): `resolve_strategy`, a checkpoint of the other strategy refused
    (`resume_check`, on rank 0: every rank stops with its one line), and the per-process cfg copy told the
    strategy that runs, so the fast-path plan and summary.json read it (one process: cfg is the user's own,
    left as it is)."""
    strategy, why = resolve_strategy(cfg, model)
    distributed.on_main(lambda: resume_check(resume_from, strategy), "checking the checkpoint's strategy")
    distributed.on_main(lambda: optimizer_check(cfg, strategy), "checking the optimizer")
    if strategy == "single":
        return strategy, []
    cfg.distributed.strategy = strategy
    return strategy, [line for line in (why, plan_line(cfg, strategy)) if line]


def _auto(cfg, model) -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        return "ddp", "strategy: ddp (auto: no GPU, every process holds the model in host memory)"
    if cfg.model.method == "qlora":  # its 4-bit storage is chosen at load time, before any estimate (load.bnb_arguments)
        return "ddp", ("strategy: ddp (auto: qlora is sized for one GPU; distributed.strategy=fsdp shards its 4-bit "
                       "base, stored in the compute dtype)")
    from ..model.fast.memory import fits

    ok, why = fits(cfg, model, True, cfg.train.micro_batch_size * cfg.data.max_seq_length)
    if ok:
        return "ddp", f"strategy: ddp (auto: one replica with every layer checkpointed, {why} of one GPU)"
    return "fsdp", f"strategy: fsdp (auto: one replica with every layer checkpointed, {why} of one GPU: sharded)"


def checkpointing(cfg) -> bool:
    """FSDP's activation checkpointing: asked for in distributed.fsdp, or by train.gradient_checkpointing=on."""
    return cfg.distributed.fsdp.activation_checkpointing or cfg.train.gradient_checkpointing == "on"


def trainer_arguments(cfg, strategy: str) -> dict:
    """TrainingArguments fields for the strategy (none for DDP or one process: HF's defaults are DDP)."""
    if strategy != "fsdp":
        return {}
    f = cfg.distributed.fsdp
    fsdp_config = {
        "version": 2,
        "reshard_after_forward": True,  # ZeRO-3: the weights are gathered for each layer's forward and backward
        "cpu_offload": f.cpu_offload,
        "activation_checkpointing": checkpointing(cfg),
        "state_dict_type": "FULL_STATE_DICT",  # whole tensors in every checkpoint (see the module docstring)
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer (the model's _no_split_modules)
    }
    args = {"fsdp": True, "fsdp_config": fsdp_config,
            # FSDP checkpoints the layers itself; HF's checkpointing on top would gather every layer twice
            "gradient_checkpointing": False, "gradient_checkpointing_kwargs": None}
    replicas = machines()
    if f.sharding == "hybrid" and replicas > 1:
        from accelerate.parallelism_config import ParallelismConfig

        per_machine = distributed.world().size // replicas
        if per_machine < 2:
            raise ConfigError(f"distributed.fsdp.sharding=hybrid shards within each machine, but each of the {replicas} "
                              "machines runs one process; use sharding: full")
        args["parallelism_config"] = ParallelismConfig(dp_replicate_size=replicas, dp_shard_size=per_machine)
    return args


def machines() -> int:
    """Machines in the run: WORLD_SIZE / LOCAL_WORLD_SIZE (torchrun's; 1 when not set)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or distributed.world().size
    return max(1, distributed.world().size // local)


def plan_line(cfg, strategy: str) -> str | None:
    """What FSDP does in this run, one line for the plan (None for other strategies)."""
    if strategy != "fsdp":
        return None
    f = cfg.distributed.fsdp
    sharding = "full" if f.sharding == "full" else (
        "hybrid (sharded within each machine, replicated across machines)" if machines() > 1
        else "hybrid = full on one machine")
    return (f"fsdp2: weights, gradients and optimizer states sharded over {distributed.world().size} processes "
            f"(sharding {sharding}); activation checkpointing {'on' if checkpointing(cfg) else 'off'}; "
            f"cpu offload {'on' if f.cpu_offload else 'off'}; checkpoints hold whole tensors (FULL_STATE_DICT)")


def optimizer_check(cfg, strategy: str) -> None:
    """bitsandbytes' 8-bit optimizers update plain tensors: on FSDP2's DTensor shards their first step
    fails ("got mixed torch.Tensor and DTensor", bitsandbytes 0.50, 2 x H200:
    benchmarks/results/scale_h200/call9_scale_2gpu_8b_full_fsdp.log). Refused before training starts.
    torchao's AdamW8bit (adamw_torch_8bit) steps the shards: 8B full on 2 x H200, call14_*.json."""
    name = cfg.train.optimizer
    if strategy == "fsdp" and name in ("adamw_8bit", "paged_adamw_8bit"):
        raise ConfigError(f"train.optimizer: {name} (bitsandbytes) cannot step FSDP2's sharded weights; use "
                          "train.optimizer=adamw_torch_8bit (torchao's 8-bit AdamW) or adamw_torch under "
                          "distributed.strategy=fsdp, or distributed.strategy=ddp")


def resume_check(checkpoint: Path | None, strategy: str) -> None:
    """A checkpoint resumes under the strategy that wrote it: HF reads an FSDP checkpoint's model and
    optimizer files (accelerate's, keyed by tensor name) only under FSDP, and under FSDP reads nothing else.
    The process count may differ (DDP: tested 2 -> 1; FSDP: whole tensors, so any count of 2 or more)."""
    if checkpoint is None:
        return
    written_by_fsdp = (checkpoint / FSDP_MODEL_FILE).is_file()
    if written_by_fsdp and strategy != "fsdp":
        raise ConfigError(f"train.resume: {checkpoint} was written by FSDP (distributed.strategy=fsdp) and this run is "
                          f"{'one process' if strategy == 'single' else strategy}; resume it with "
                          "distributed.strategy=fsdp and --nproc 2 or more")
    if strategy == "fsdp" and not written_by_fsdp:
        raise ConfigError(f"train.resume: {checkpoint} was written without FSDP and this run is fsdp; resume it with "
                          "distributed.strategy=ddp (or in one process)")


def full_state_dict(trainer) -> dict | None:
    """The trained weights, whole, on rank 0 (None elsewhere), gathered by every rank. LoRA: only the
    trainable tensors travel (a 70B base is never gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..model.adapters import is_peft

    model = trainer.model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_peft(model))
    state = get_model_state_dict(model, options=options)
    return state if distributed.is_main() else None


def load_whole(model, checkpoint: Path) -> None:
    """A checkpoint's trained tensors (accelerate's FULL_STATE_DICT file: whole tensors) into the sharded
    model: every rank reads the file and keeps its own shards. accelerate 1.15's own loader broadcasts from
    rank 0 instead, and with torch 2.13 rank 0 waits in that broadcast while the others have gone on (a
    resumed 2-process CPU run hung there); reading on every rank needs no collective at all."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = torch.load(checkpoint / FSDP_MODEL_FILE, map_location="cpu", weights_only=True)
    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys or not state:
        raise ConfigError(f"train.resume: {checkpoint / FSDP_MODEL_FILE} does not fit this model "
                          f"(unexpected tensors: {sorted(result.unexpected_keys)[:3]})")
