"""NaN/Inf losses and gradients (train.on_nonfinite): stop before the bad update, or skip it.

Left alone, transformers applies a NaN update and its `logging_nan_inf_filter` (switched off in
setup.py) logs a made-up loss: a diverged run looked like a success. Here every optimizer step is
checked right before `optimizer.step()` (the Trainer's `on_pre_optimizer_step` event), from the
losses of its micro-batches (the Trainer hands each one to `add_loss`) and the norm of its gradients:

    stop (default)  the step's gradients are dropped (no update), training stops, nothing is saved
                    after it; train() writes summary.json and raises TrainingDiverged (exit code 3).
    skip            the step's gradients are dropped and training goes on, at most
                    train.max_nonfinite_skips times in one process; the next one stops as above.

Under fp16 the grad scaler makes Inf gradients on purpose and skips those steps itself, so only the
loss is checked there (and the scaler, which sees the NaN gradients a NaN loss leaves, drops the update).

With the optimizer in the backward (in_backward.py) the update happens before this check: the
Trainer skips a NaN/Inf loss's update before its backward (so both policies work as above), and the
gradient norm comes from the optimizer's hooks. A NaN/Inf gradient under a finite loss is in the
weights already: training stops, under either policy, and nothing from that step on is saved.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .distributed import is_main
from .in_backward import in_backward_of

ADVICE = (
    "Try a lower train.learning_rate, warm-up (train.warmup_steps), gradient clipping "
    "(train.max_grad_norm=1.0) or train.precision=fp32/bf16, in a fresh run (a resumed run keeps "
    "its checkpoint's learning rate)"
)


@dataclass
class Divergence:
    """Why and where training stopped."""

    step: int                       # the optimizer step whose update was refused
    reason: str                     # e.g. "the loss is nan"
    last_finite_loss: float | None  # the last step whose loss was finite (None: none was)
    last_finite_step: int | None

    def message(self, last_good: Path | None) -> str:
        """One line: where, why, what survived, what to try."""
        if self.last_finite_loss is None:
            loss = "no step had a finite loss"
        else:
            loss = f"last finite loss {self.last_finite_loss:.4f} at step {self.last_finite_step}"
        kept = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was saved before it"
        return f"training stopped at step {self.step}: {self.reason}; {loss}; nothing after it was saved ({kept}). {ADVICE}."

    def as_dict(self, last_good: Path | None) -> dict:
        return {**asdict(self), "last_good_checkpoint": str(last_good) if last_good else None}


def _describe(loss: float | None, grad_norm: float | None) -> str | None:
    """None when both are finite, else what was not."""
    if loss is not None and not math.isfinite(loss):
        return f"the loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


def _grad_norm(model) -> torch.Tensor | None:
    """L2 norm of all gradients (NaN/Inf when any entry is), without one huge temporary."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in model.parameters() if p.grad is not None]
    if not norms:
        return None
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))


def _whole(t: torch.Tensor) -> torch.Tensor:
    """FSDP: a norm over sharded gradients (a DTensor) made whole on every process (one all-reduce)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _any_process(bad: bool, device) -> bool:
    """True when any process saw a non-finite value: all take the same decision (one process that
    stopped alone would leave the others waiting in the next all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bad
    flag = torch.tensor(float(bad), device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


class NonFiniteGuard(TrainerCallback):
    """Checks each optimizer step before it is applied; `stopped` says why training stopped."""

    def __init__(self, policy: str = "stop", max_skips: int = 3):
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite policy must be stop or skip, got {policy!r}")
        self.policy = policy
        self.max_skips = max_skips
        self.skipped: list[int] = []           # steps whose update was dropped (policy skip)
        self.stopped: Divergence | None = None
        self.last_finite: tuple[int, float] | None = None  # (step, loss)
        self._loss: torch.Tensor | None = None  # sum of this step's micro-batch losses, on device
        # the norm the Trainer measured for clipping / logging this step (checkpoint.py sets it):
        # measuring it again would walk every gradient a second time
        self.measured_grad_norm: torch.Tensor | float | None = None

    def add_loss(self, loss: torch.Tensor) -> None:
        """Called by the Trainer for every micro-batch (kept on the device: no sync per micro-batch)."""
        loss = loss.detach().float().reshape(())
        self._loss = loss if self._loss is None else self._loss + loss

    def stop(self, step: int, reason: str) -> Divergence:
        step_, loss = self.last_finite or (None, None)
        self.stopped = Divergence(step, reason, loss, step_)
        return self.stopped

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1  # the step about to be applied
        in_bwd = in_backward_of(optimizer)
        loss, grad_norm = self._read(model, check_grads=not args.fp16, in_bwd=in_bwd)
        if loss is not None and math.isfinite(loss):
            self.last_finite = (step, loss)
        reason = _describe(loss, grad_norm)
        if not _any_process(reason is not None, args.device):
            return
        reason = reason or "a loss or gradient was not finite on another process"
        if in_bwd is not None and in_bwd.updates_applied:
            # Neither dropping gradients nor skipping can take this update back.
            unskippable = " (train.on_nonfinite=skip cannot undo it)" if self.policy == "skip" else ""
            self.stop(step, f"{reason}; its update was already applied (the optimizer steps inside the backward), "
                            f"so the weights of this step are not saved{unskippable}")
            control.should_training_stop = True
            return
        if model is not None and not args.fp16:
            # No gradient, no update: optimizers skip parameters whose .grad is None entirely
            # (weights, moments and step counts stay as they were). Under fp16 the grad scaler finds
            # the NaN/Inf in these gradients and skips the update itself; with no gradients at all
            # it would fail ("No inf checks were recorded for this optimizer").
            model.zero_grad(set_to_none=True)
        if self.policy == "skip" and len(self.skipped) < self.max_skips:
            self.skipped.append(step)
            if is_main():  # every rank skips alike: one line
                print(f"step {step}: {reason}; update skipped ({len(self.skipped)} of train.max_nonfinite_skips="
                      f"{self.max_skips})", flush=True)
            return
        if self.policy == "skip":
            reason += f" (after {self.max_skips} skipped steps, the most train.max_nonfinite_skips allows)"
        self.stop(step, reason)
        control.should_training_stop = True

    def _read(self, model, check_grads: bool, in_bwd=None) -> tuple[float | None, float | None]:
        """(this step's loss, its gradient norm) as floats, with one device sync; the norm from the
        optimizer's hooks when it stepped in the backward (no gradient is left to measure)."""
        loss, self._loss = self._loss, None
        measured, self.measured_grad_norm = self.measured_grad_norm, None
        if in_bwd is not None:
            norm = in_bwd.grad_norm()
        elif not check_grads or model is None:
            norm = None
        else:
            norm = torch.as_tensor(measured, dtype=torch.float32) if measured is not None else _grad_norm(model)
        parts = [t for t in (loss, norm) if t is not None]
        if not parts:
            return None, None
        values = torch.stack([_whole(t).to(parts[0].device) for t in parts]).tolist()
        return (values.pop(0) if loss is not None else None), (values.pop(0) if norm is not None else None)

    def on_step_end(self, args, state, control, **kwargs):
        return self._no_save_after_stop(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._no_save_after_stop(control)

    def _no_save_after_stop(self, control):
        # The refused step is still counted by the Trainer; neither save nor evaluate it (its log
        # line stays: metrics.jsonl shows the non-finite loss).
        if self.stopped is not None:
            control.should_save = False
            control.should_evaluate = False
        return control
