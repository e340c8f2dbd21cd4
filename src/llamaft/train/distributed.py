"""Several processes (DDP through the HF Trainer): who reads, who writes, who waits.

    llamaft train run.yaml --nproc 2                      # launch.py starts the processes
    torchrun --nproc-per-node 2 -m llamaft train run.yaml  # or accelerate launch: the same from here on

Every process runs the same recipe; RANK / WORLD_SIZE / LOCAL_RANK, set by whichever launcher
started it, say which one this is (nothing here assumes that llamaft started the launcher). The rules:

- rank 0 checks the config and run directory, reads, validates and tokenizes the data (`on_main`);
  the other ranks receive the result, or rank 0's error: a bad row stops every rank with the same
  exit code and one line (printed by rank 0 only), instead of the others waiting for a rank that is gone.
- only rank 0 writes the run directory (config.yaml, metrics.jsonl, TensorBoard, summary.json, plots,
  report, final weights); in a checkpoint every rank writes its own RNG state and rank 0 publishes it
  (checkpoint.py); generation metrics run on rank 0 while the others wait (`wait_for_main`).
- waiting for rank 0 (its data, generation, checkpoint publishing) goes through a gloo group of its
  own with a long timeout (`WAIT`): on GPUs the default (NCCL) group's watchdog would end a rank that
  waits 30 minutes while rank 0 tokenizes a large data set. A rank that dies closes its sockets, so
  the others' waits fail at once (and the launcher ends them) rather than after the timeout.
- the configured batch is global: train.micro_batch_size is per process, and each of N processes
  runs train.gradient_accumulation / N micro-batches per optimizer step (`per_process`), so N
  processes train on the same sequences per step as one, with the same loss (HF averages the loss
  over the label tokens of all processes' micro-batches of a step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import ConfigError, LlamaftError

COLLECTIVE = timedelta(minutes=30)  # the default group (DDP's all-reduces): HF's own ddp_timeout
WAIT = timedelta(hours=24)  # waits for rank 0's own work (tokenizing, generating, publishing a checkpoint)

_waits = None  # the gloo group those waits go through (init())


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all (RANK)
    local_rank: int = 0  # this process on its machine (LOCAL_RANK): its GPU
    size: int = 1  # processes in all (WORLD_SIZE)

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, as the launcher (torchrun, accelerate launch, llamaft --nproc) set it."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def is_main() -> bool:
    return world().main


def init() -> World:
    """The process groups, once per process when there are several (else nothing): the default one as
    HF's Trainer would create it (NCCL on GPUs, gloo on CPU; it reuses ours), and the waiting group.
    Early, so that rank 0 can hand the data to the others before any Trainer exists."""
    global _waits
    w = world()
    if w.size == 1 or _waits is not None:
        return w
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE)
    _waits = dist.new_group(backend="gloo", timeout=WAIT)
    return w


def close() -> None:
    """Every rank here (the run directory is complete), then the groups are taken down."""
    global _waits
    if _waits is None:
        return
    barrier()
    dist.destroy_process_group()
    _waits = None


class SharedError(LlamaftError):
    """Rank 0's error, raised on the other ranks too: same message and exit code; quiet, because rank 0
    prints it (one line, not one per process)."""

    quiet = True

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def nproc_flag() -> str:
    """` --nproc N` for a command line that continues this run (empty for one process)."""
    size = world().size
    return f" --nproc {size}" if size > 1 else ""


def once(err: LlamaftError) -> LlamaftError:
    """err, printed by rank 0 only: for an error every rank raises alike (e.g. a non-finite stop,
    decided together)."""
    if not is_main():
        err.quiet = True
    return err


def on_main(fn: Callable[[], Any], what: str) -> Any:
    """fn() on rank 0; every rank returns its result (pickled through the waiting group: it holds only
    what our own readers built) or raises its error. `what`: what rank 0 was doing, for a crash."""
    if _waits is None:
        return fn()
    if not is_main():
        kind, value, code = _broadcast(None)
        if kind == "error":
            raise SharedError(value, code)
        return value
    try:
        result = fn()
    except LlamaftError as err:
        _broadcast(("error", str(err), err.exit_code))
        raise
    except KeyboardInterrupt:  # every rank got the signal itself
        raise
    except BaseException as err:  # a bug: rank 0 shows the traceback, the others stop quietly
        _broadcast(("error", f"rank 0 failed while {what}: {type(err).__name__}", 1))
        raise
    _broadcast(("ok", result, 0))
    return result


def from_main(value: Any) -> Any:
    """Rank 0's value on every rank (a decision all ranks must take alike)."""
    return value if _waits is None else _broadcast(value)


def barrier() -> None:
    """Wait until every rank is here, as long as rank 0's work takes (`WAIT`)."""
    if _waits is not None:
        _guarded(dist.barrier, group=_waits)


def _broadcast(value: Any) -> Any:
    box = [value]
    _guarded(dist.broadcast_object_list, box, src=0, group=_waits)
    return box[0]


def _guarded(op, *args, **kwargs) -> None:
    """op; a rank that died meanwhile (its sockets closed) stops this one quietly: the launcher reports
    the rank that failed first, and its message is already out."""
    try:
        op(*args, **kwargs)
    except RuntimeError as err:  # gloo: "Connection closed by peer" (torch's DistError is one too)
        raise SharedError(f"another process stopped ({str(err).splitlines()[0][:200]})", 1) from None


def wait_for_main():
    """A Trainer callback: after each evaluation every rank waits for rank 0's generation metrics
    (callbacks.py computes them there only), through the waiting group, so that no rank runs ahead
    into the next all-reduce; and takes rank 0's decision to stop there (a callback that reads those
    metrics, e.g. a sweep's pruner, decides on rank 0; added last, this sees its decision).
    (transformers is imported here, not with this module: the launcher imports it, and
    transformers' Trainer modules take seconds.)"""
    from transformers import TrainerCallback

    class WaitForMain(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            control.should_training_stop = from_main(control.should_training_stop)

    return WaitForMain()


# ---------------------------------------------------------------------------------------------
# The batch: the configured one is global


def check(cfg, size: int | None = None) -> None:
    """What several processes cannot run, before anything is read: a batch that does not divide, or
    an accelerate config for another strategy."""
    per_process(cfg, size)
    strategy = cfg.distributed.strategy
    for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "false").lower() == "true" and not (name == "FSDP" and strategy == "fsdp"):
            fix = "set distributed.strategy=fsdp" if name == "FSDP" else "use an accelerate config without DeepSpeed"
            raise ConfigError(f"the launcher asks for {name} ({env}=true); llamaft runs distributed.strategy="
                              f"{strategy} (the strategy is the config's, not the launcher's): {fix}, or start it "
                              "with `llamaft train --nproc N` or torchrun")


def per_process(cfg, size: int | None = None):
    """cfg as each of `size` processes trains it (default: this run's): train.gradient_accumulation /
    size micro-batches per optimizer step, so that the global batch stays micro_batch_size x
    gradient_accumulation sequences. One process: cfg itself."""
    size = world().size if size is None else size
    if size == 1:
        return cfg
    micro, accum = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    if accum % size:
        fit = -(-accum // size) * size
        raise ConfigError(
            f"train.gradient_accumulation={accum} does not divide among {size} processes: the configured batch "
            f"(train.micro_batch_size x train.gradient_accumulation = {micro * accum} sequences per optimizer step) "
            f"is global and each process runs gradient_accumulation / {size} micro-batches; set "
            f"train.gradient_accumulation={fit} (a multiple of {size}) or use a process count that divides {accum}")
    mine = cfg.model_copy(deep=True)
    mine.train.gradient_accumulation = accum // size
    return mine


def batch_summary(args) -> dict:
    """summary.json's `batch`: how the HF Trainer steps (per process) and what that makes per optimizer step.
    The strategy is the one that ran (HF's `fsdp` argument is set exactly when FSDP runs), not the
    config's `auto`."""
    n = max(1, args.world_size)
    summary = {"micro_batch_size": args.per_device_train_batch_size,  # per process
               "gradient_accumulation": args.gradient_accumulation_steps,  # per process
               "processes": n,
               "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * n}
    if n > 1:
        summary["strategy"] = "fsdp" if getattr(args, "fsdp", None) else "ddp"
    return summary


def batch_line(args) -> str:
    b = batch_summary(args)
    return (f"{b.get('strategy', 'single process')}: {b['processes']} processes x {b['micro_batch_size']} sequences "
            f"per micro-batch x {b['gradient_accumulation']} accumulation = {b['global_batch']} sequences per optimizer "
            "step (the configured train.micro_batch_size x train.gradient_accumulation)")
