"""Atomic checkpoints and resume.

transformers 5.17 writes `checkpoint-N/` in place (weights, optimizer, scheduler, RNG, then
trainer_state.json), so a crash mid-save leaves a directory that `get_last_checkpoint` would pick.
Here the Trainer writes into `checkpoints/.staging/checkpoint-N`, files are fsynced, and the
directory is renamed into place: a `checkpoint-N` either is complete or does not exist. Resume also
requires `trainer_state.json` (written last by HF), so directories from other writers count only
when finished.

A checkpoint is only written when every trainable weight is finite (a NaN checkpoint would be the
"latest" one that resume and merge pick up), and a run resumed at the end of its schedule trains no
further step (HF would train one: it checks max_steps only after a step). With the optimizer in the
backward (in_backward.py) a NaN/Inf loss is caught before its backward, so it never updates a weight.

Several processes: rank 0 empties the staging directory, every rank writes its part (rank 0 the
weights, optimizer and trainer state; each rank its rng_state_<rank>.pth), and once all are done
rank 0 alone publishes and rotates; the others wait for it at each step (distributed.barrier).

Where a run starts: `prepare_run_dir(cfg)` -> (run directory, checkpoint to resume from or None).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..errors import LlamaftError
from ..model.adapters import save_trained
from ..model.finite import first_nonfinite_param
from ..paths import as_os_error, check_output_dir, reason
from . import distributed
from .fsdp import full_state_dict, load_whole
from .in_backward import in_backward_of
from .nonfinite import NonFiniteGuard

log = logging.getLogger(__name__)

STAGING = ".staging"
STATE_FILE = "trainer_state.json"  # HF writes it after weights, optimizer, scheduler and RNG
_CKPT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _fsync_tree(root: Path) -> None:
    """Flush file contents, then directory entries, so a rename never publishes unwritten data."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Move a finished checkpoint into place; an older one at the same step is replaced."""
    _fsync_tree(staged)
    old = None
    if final.exists():
        old = final.with_name(f".replaced-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class AtomicCheckpointTrainer(Trainer):
    """HF Trainer with the behaviours we change: checkpoints appear only when complete and finite,
    every step passes the non-finite guard (nonfinite.py), a resumed run never trains past the end of
    its schedule, and with the optimizer in the backward each loss is checked before its backward."""

    _staging_root: str | None = None
    _params_for_flops: int | None = None

    def __init__(self, *args, on_nonfinite: str = "stop", max_nonfinite_skips: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.nonfinite_guard = NonFiniteGuard(on_nonfinite, max_nonfinite_skips)
        # Last, so that it sees the gradients exactly as optimizer.step() will.
        self.add_callback(self.nonfinite_guard)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:
            cpu_fsdp(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        # FSDP: the trained tensors gathered whole by every rank (LoRA: the adapter only, never the
        # frozen base), written by rank 0 in the same format as one process writes
        state = full_state_dict(self)
        if self.args.should_save:
            save_trained(self.model, output_dir or self.args.output_dir, state)
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints hold the trained adapter only: a continued adapter's "ref" copy (DPO) and a stacked
        run's frozen adapter, which PEFT writes into subfolders, are rebuilt from the run started from."""
        super()._save(output_dir, state_dict)
        for name in getattr(self.model, "peft_config", {}):
            if name != "default":
                shutil.rmtree(Path(output_dir or self.args.output_dir) / name, ignore_errors=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        return load_whole(self.model, Path(resume_from_checkpoint))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.add_loss(loss)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        in_bwd = in_backward_of(self.optimizer)
        if in_bwd is not None and model.training and torch.is_grad_enabled():
            # The backward that follows updates the weights as it goes: the guard's check before
            # optimizer.step() would come too late. One host sync per micro-batch (accumulation is 1).
            loss = result[0] if return_outputs else result
            in_bwd.begin_backward(skip_updates=not bool(torch.isfinite(loss.detach()).all()))
        return result

    def _get_grad_norm(self, model, grad_norm=None):
        in_bwd = in_backward_of(self.optimizer)
        if in_bwd is not None:
            return in_bwd.grad_norm()  # the gradients are gone; the hooks measured them on the way
        norm = super()._get_grad_norm(model, grad_norm)
        self.nonfinite_guard.measured_grad_norm = norm  # the guard checks this one instead of measuring again
        return norm

    def floating_point_ops(self, inputs) -> int:
        # HF's own (6 x tokens x parameters) counts the parameters again on every micro-batch by
        # walking every module: ~9 ms of host time per micro-batch on an 8B model, during which the
        # GPU had nothing queued (benchmarks/results/budget_h200, profiled step). The count is fixed.
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):  # HF's test (a BatchEncoding too)
            return 0
        if self._params_for_flops is None:
            self._params_for_flops = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._params_for_flops

    def log(self, logs: dict, start_time: float | None = None) -> None:
        super().log(logs, start_time)
        # HF resets its running loss with `tr_loss -= tr_loss` after logging it, and NaN - NaN stays
        # NaN: with logging_nan_inf_filter off, every later log would repeat one skipped step's NaN.
        running = getattr(self, "_tr_loss", None)
        if "loss" in logs and isinstance(running, torch.Tensor) and not torch.isfinite(running).all():
            running.zero_()

    def _run_epoch(self, *args, **kwargs):
        # HF stops when DefaultFlowCallback sees global_step >= max_steps at the end of a step, so a
        # run resumed at its last step (max_steps or epochs not ending on an epoch boundary) would
        # train one step more. Nothing left to do: no step.
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        # While saving, HF's _save_checkpoint asks this for the parent of checkpoint-N.
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        bad = first_nonfinite_param(self.model, trainable_only=True)
        if bad is not None:
            # Never publish NaN weights: the latest checkpoint is what resume and merge pick up.
            self.nonfinite_guard.stop(self.state.global_step, f"weight {bad} is not finite")
            self.control.should_training_stop = True
            return
        root = Path(super()._get_output_dir(trial))
        staging = root / STAGING
        if self.args.should_save:  # rank 0 (HF's own rule for who writes a checkpoint)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        distributed.barrier()  # staging is empty before any rank writes its RNG state into it
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as err:  # also an interrupt (Ctrl-C, SIGTERM) in the middle of the save
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays behind
            why = write_failure(err) if isinstance(err, Exception) else None
            if why is None:
                raise
            last = latest_complete(root)
            then = (f"the last good checkpoint is {last} (free space, then continue with train.resume=true)" if last
                    else "no checkpoint was completed yet (free space, then start the run again)")
            raise LlamaftError(f"checkpoint of step {self.state.global_step} could not be written to {root}: {why}; "
                               f"nothing was published, {then}") from None
        finally:
            self._staging_root = None
        distributed.barrier()  # every rank's files are in staging
        if not self.args.should_save:
            return
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        publish(staging / name, root / name)
        shutil.rmtree(staging, ignore_errors=True)
        # HF rotated inside .staging (a no-op); rotate the real directory by step number (mtime is
        # meaningless after a rename).
        rotate_checkpoints(str(root), save_total_limit=self.args.save_total_limit, use_mtime=False)

    def steps_left(self, checkpoint: Path) -> int:
        """Optimizer steps the schedule holds after `checkpoint` (<= 0: the run is at its end), by
        HF's own arithmetic for this config and data (max_steps, or epochs x steps per epoch)."""
        max_steps = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        return max_steps - TrainerState.load_from_json(str(checkpoint / STATE_FILE)).global_step


def cpu_fsdp(trainer) -> None:
    """FSDP2 on CPU processes (gloo): accelerate 1.15 attaches the FSDP plugin only to GPU-type launches
    (state.py: MULTI_CPU is not among them) and would train DDP instead, silently. torch's fully_shard
    runs on a CPU mesh over gloo, so the plugin is attached here as accelerate would on a GPU: the same
    code path (sharding, FULL_STATE_DICT checkpoints, resume) is what the CPU tests exercise."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise LlamaftError(f"FSDP was asked for but accelerate runs {state.distributed_type} here")
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


# torch's zip writer reports a full disk as a RuntimeError: "PytorchStreamWriter failed writing file
# data/0: file write failed" or "[enforce fail at inline_container.cc] . unexpected pos 14336 vs 14228".
_TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed|unexpected pos \d+ vs \d+|file write failed")


def write_failure(err: BaseException) -> str | None:
    """Why a checkpoint write failed, when the machine (disk full, read-only, quota) is the cause;
    None for anything else (a bug stays a traceback)."""
    os_err = as_os_error(err)
    if os_err is not None:
        return reason(os_err)
    if isinstance(err, RuntimeError) and _TORCH_WRITE_FAILED.search(str(err)):
        return f"the write failed, most likely a full disk ({str(err).strip().splitlines()[-1][:120]})"
    return None


def out_of_memory_message(err: BaseException, plan, step: int) -> str:
    """One line for a CUDA out-of-memory: where, within which budget, and what to change."""
    budget = getattr(plan, "budget", None)
    within = f" within the run's memory budget ({budget.describe()})" if budget is not None else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else "CUDA out of memory"
    return (f"out of GPU memory at step {step}{within}: {first[:200]}; lower train.micro_batch_size or "
            "data.max_seq_length, raise fast.memory_gib if the card has more free, or use model.method=qlora")


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def _step(path: Path) -> int | None:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else None


def clean_incomplete(ckpt_root: Path) -> list[Path]:
    """Remove leftovers of crashed saves (staging dirs, checkpoint dirs without trainer state).

    Left in place they would sort as the newest checkpoint in HF's rotation and push out real ones.
    """
    removed = []
    if not ckpt_root.is_dir():
        return removed
    for p in ckpt_root.iterdir():
        if p.name == STAGING or p.name.startswith(".replaced-") or (_step(p) is not None and not is_complete(p)):
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def latest_complete(ckpt_root: Path) -> Path | None:
    if not ckpt_root.is_dir():
        return None
    done = [(s, p) for p in ckpt_root.iterdir() if (s := _step(p)) is not None and is_complete(p)]
    return max(done)[1] if done else None


def resolve_resume(resume: bool | str, ckpt_root: Path) -> Path | None:
    """train.resume → the checkpoint to continue from (None: fresh run)."""
    if resume is False or resume in ("", "false", "False"):
        return None
    if resume is True or resume in ("true", "True", "latest"):
        found = latest_complete(ckpt_root)
        if found is None:
            raise LlamaftError(
                f"train.resume=true but {ckpt_root} holds no complete checkpoint; "
                "start a fresh run (train.resume=false) or pass a checkpoint path"
            )
        return found
    path = Path(resume)
    if not path.is_dir():
        raise LlamaftError(f"train.resume: checkpoint not found: {resume}")
    if not is_complete(path):
        raise LlamaftError(f"train.resume: {resume} is not a complete checkpoint (no {STATE_FILE}); pick another")
    return path


def prepare_run_dir(cfg) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from); refuses to mix a fresh run into an old one.
    Creates nothing: setup() makes the directory only once every check has passed."""
    run_dir = check_output_dir(cfg.train.output_dir, "train.output_dir")  # a file, under a file, read-only: one line
    ckpt_dir = run_dir / "checkpoints"
    clean_incomplete(ckpt_dir)
    resume_from = resolve_resume(cfg.train.resume, ckpt_dir)
    # A run stopped or interrupted before its first checkpoint left only a summary: start it afresh.
    if resume_from is None and (completed(run_dir) or any(ckpt_dir.glob("checkpoint-*"))):
        raise LlamaftError(
            f"train.output_dir={run_dir} already holds a run; set train.resume=true to continue it "
            "or choose another train.output_dir"
        )
    return run_dir, resume_from


def completed(run_dir: Path) -> bool:
    """Did a run here end with status completed? (Summaries from before `status` existed were only
    written by completed runs.)"""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return summary.get("status", "completed") == "completed"
