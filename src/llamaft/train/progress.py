"""A training run's progress: real tokens/s, time per step, ETA and memory peak, in a terminal or a log,
in metrics.jsonl and in summary.json. `TrainProgress` is the Trainer callback; the recipe attaches it
in place of HF's tqdm bar and printed log dicts.

In a terminal one bar, updated every optimizer step; anywhere else (a log file, CI) one plain line per
logging step and no carriage return:

    step 6/12 · loss 0.9912 · 1,234 tok/s · 3.05 s/step · ETA 0:18 · peak 1.2 GiB
    eval alpha @ step 6 · loss 1.02 · perplexity 2.77 · exact_match 0.375 · stops_on_eos 1 · generation on 8 rows

What the numbers are:
- tokens: the non-padding input tokens of every micro-batch the model trains on (attention_mask's
  ones; a packed row's ids except its pad segment's, fast.pack_multiple), counted by a forward pre-hook on the model while
  it is in train mode with gradients on, so evaluation and generation inside training never count.
  One optimizer step sums its gradient-accumulation micro-batches. Under DDP each process counts
  its own batches (tokens/s per process).
- step time: from the end of the previous step (or of the evaluation / checkpoint / log that followed
  it) to the end of this one: data loading, forward, backward and optimizer; evaluation and saving
  are left out. tokens/s = tokens / step time over the steps since the last log.
- ETA: steps left x wall time per step so far (evaluation and saving included: the time a user waits).
- memory peak: CUDA: the device's memory in use as the driver sees it (total - free from
  torch.cuda.mem_get_info, every process on that GPU: CUDA context, kernels and every allocator
  included), sampled every 50 ms from a thread during training and after every optimizer step, the
  max; torch.cuda.max_memory_allocated (this process's tensors) and max_memory_reserved (its
  allocator's cache) beside it. Elsewhere: this process's peak resident set size
  (resource.getrusage), model loading included.

metrics.jsonl gets train/tokens_per_s, train/step_time_s, train/tokens_seen, train/mem_peak_gib
(+ train/cuda_max_allocated_gib, train/cuda_max_reserved_gib) on every train/loss row; summary.json a `throughput` block
(`TrainProgress.throughput`).
"""

from __future__ import annotations

import resource
import sys
import threading
import time

import torch
from transformers import TrainerCallback

from ..console import make_console
from .callbacks import rename_logs
from .progress_display import GIB, Status, fmt_bytes, fmt_duration, fmt_eval, fmt_step_time, make_display

TOKENS_COUNTED = ("non-padding input tokens of every training micro-batch (attention_mask, or every id of a "
                  "packed row but its pad segment's), this process only (under DDP: per process)")


def batch_tokens(inputs: dict, pad_id: int | None = None):
    """Non-padding tokens of one batch: attention_mask's ones, else (a packed row) every input id but
    `pad_id`'s: the pad segment of fast.pack_multiple (the pad id is a special token, which chat.py
    never lets into an example). A tensor stays on its device: no host sync per micro-batch."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.sum()
    ids = inputs.get("input_ids")
    if ids is None:
        return 0
    return ids.numel() if pad_id is None else ids.numel() - (ids == pad_id).sum()


class TokenCounter:
    """batch_tokens of every forward of `model` that trains (train mode and grad enabled); `pad_id`:
    the pad of padded packed rows (plan.pack_multiple), None when rows are not padded."""

    def __init__(self, pad_id: int | None = None):
        self.pad_id = pad_id
        self.total = 0
        self._pending = 0
        self._handle = None

    def attach(self, model) -> None:
        self.detach()
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _count(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            inputs = kwargs if "input_ids" in kwargs or not args else {"input_ids": args[0], **kwargs}
            self._pending = self._pending + batch_tokens(inputs, self.pad_id)

    def take(self) -> int:
        """Tokens counted since the last take (one host sync per optimizer step)."""
        n, self._pending = int(self._pending), 0
        self.total += n
        return n


class MemoryPeak:
    """The run's memory peak on `device` (see the module doc for how): `sample()` after every step,
    and on CUDA a thread sampling the driver's view every `interval` s between `start()` and `stop()`
    (a step's peak lies inside it: the backward's, the optimizer's)."""

    def __init__(self, device, interval: float = 0.05):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            # the sampling thread's own current device is GPU 0, whatever this process's is
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.peak_bytes = 0
        self.allocated_bytes: int | None = None
        self.reserved_bytes: int | None = None
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _device_used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def sample(self) -> None:
        if self.cuda:
            self.peak_bytes = max(self.peak_bytes, self._device_used())
            self.allocated_bytes = torch.cuda.max_memory_allocated(self.device)
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        else:
            self.peak_bytes = max(self.peak_bytes, rss_peak_bytes())

    def start(self) -> None:
        if self.cuda and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="llamaft-memory-peak", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self._device_used())

    def how(self) -> str:
        if self.cuda:
            return ("CUDA device memory in use, total - free from torch.cuda.mem_get_info (every process on the GPU), "
                    f"max over samples every {self.interval:g} s during training and after each optimizer step")
        return "peak resident set size of this process (resource.getrusage ru_maxrss), model loading included"

    def name(self) -> str:
        if self.cuda:
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)


def rss_peak_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


# ---------------------------------------------------------------------------------------------
# The callback


class TrainProgress(TrainerCallback):
    """Counts, times and shows the run (see the module doc); put it before the callbacks that write
    logs (metrics.jsonl, TensorBoard): it adds its numbers to every log event that has a train loss."""

    def __init__(self, set_names: list[str] = (), console=None, clock=time.perf_counter, pad_id: int | None = None):
        self.set_names = list(set_names)
        self.console = console
        self.clock = clock
        self.tokens = TokenCounter(pad_id)  # pad_id: packed rows padded to a multiple (plan.pack_multiple)
        self.memory: MemoryPeak | None = None
        self.display = None
        self.began = self.ended = self.mark = None  # clock times
        self.first_step = 0  # global_step when this process began (a resumed run starts past 0)
        self.steps = 0  # optimizer steps timed in this process
        self.train_time = 0.0  # their summed step times
        self.loss: float | None = None
        self._window = (0, 0.0, 0)  # (tokens, train_time, steps) at the last train log
        self._evals: dict[str, dict] = {}  # set -> metrics logged at this evaluation, not yet shown

    # -- the Trainer's events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.began = self.mark = self.clock()
        self.first_step = state.global_step
        self.memory = MemoryPeak(args.device)
        self.memory.start()
        if model is not None:
            self.tokens.attach(model)
        if state.is_world_process_zero:
            console = self.console or make_console()
            self.display = make_display(console)
            self.display.start(state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.tokens.take()
        now = self.clock()
        self.train_time += now - self.mark
        self.steps += 1
        self.mark = now
        self.memory.sample()
        self._show_evals()
        if self.display is not None:
            self.display.step(self.status(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.mark = self.clock()  # logging, evaluation (generation logs through here) and saving are not step time
        if not logs:
            return
        if "loss" in logs and self.began is not None:
            self.loss = logs["loss"] if isinstance(logs["loss"], (int, float)) else None
            logs.update(self.log_values())
            if self.display is not None:
                self.display.logged(self.status(state))
            self._window = (self.tokens.total, self.train_time, self.steps)
        self._collect_evals(logs, state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.mark = self.clock()

    def on_save(self, args, state, control, **kwargs):
        self.mark = self.clock()

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = self.clock()
        self.close()
        if state.is_world_process_zero and self.steps:
            self._print(self.final_line())

    def close(self) -> None:
        """Stop counting and end the bar (also after an interrupt or an error, when HF ends nothing)."""
        self.tokens.detach()
        if self.memory is not None:
            self.memory.stop()
        self._show_evals()
        if self.display is not None:
            self.display.stop()

    # -- the numbers

    def _since_log(self) -> tuple[int, float, int]:
        tokens, train_time, steps = self._window
        return self.tokens.total - tokens, self.train_time - train_time, self.steps - steps

    def status(self, state) -> Status:
        tokens, seconds, steps = self._since_log()
        done = state.global_step - self.first_step
        eta = (self.clock() - self.began) / done * max(state.max_steps - state.global_step, 0) if done > 0 else None
        return Status(step=state.global_step, total=state.max_steps, loss=self.loss,
                      tokens_per_s=tokens / seconds if steps and seconds > 0 else None,
                      step_time_s=seconds / steps if steps else None, eta_s=eta,
                      peak_bytes=self.memory.peak_bytes if self.memory else None)

    def log_values(self) -> dict:
        """What a train log event gets (metrics.jsonl: train/<key>): the steps since the last one."""
        tokens, seconds, steps = self._since_log()
        if not steps or seconds <= 0:
            return {}
        values = {"tokens_per_s": round(tokens / seconds, 1), "step_time_s": round(seconds / steps, 4),
                  "mem_peak_gib": round(self.memory.peak_bytes / GIB, 3)}
        if self.memory.allocated_bytes is not None:
            values["cuda_max_allocated_gib"] = round(self.memory.allocated_bytes / GIB, 3)
            values["cuda_max_reserved_gib"] = round(self.memory.reserved_bytes / GIB, 3)
        return values

    def throughput(self) -> dict | None:
        """summary.json's `throughput` block; None when training never began in this process."""
        if self.began is None:
            return None
        rate = self.tokens.total / self.train_time if self.train_time > 0 else None
        block = {
            "tokens_per_s": round(rate, 1) if rate is not None else None,  # mean: train_tokens / train_time_s
            "step_time_s": round(self.train_time / self.steps, 4) if self.steps else None,
            "train_tokens": self.tokens.total,
            "steps": self.steps,  # optimizer steps this process ran (a resumed run: since the resume)
            "train_time_s": round(self.train_time, 3),  # their step times: evaluation and saving left out
            "wall_time_s": round((self.ended or self.clock()) - self.began, 3),  # train begin to end, all included
            "device": self.memory.name(),
            "memory_peak_gib": round(self.memory.peak_bytes / GIB, 3),
            "memory_measured": self.memory.how(),
            "tokens_counted": TOKENS_COUNTED,
        }
        if self.memory.allocated_bytes is not None:
            block["cuda_max_allocated_gib"] = round(self.memory.allocated_bytes / GIB, 3)
            block["cuda_max_reserved_gib"] = round(self.memory.reserved_bytes / GIB, 3)
        return block

    def final_line(self) -> str:
        t = self.throughput()
        parts = [f"trained {t['steps']} steps in {fmt_duration(t['wall_time_s'])}"]
        if t["tokens_per_s"] is not None:
            parts += [f"{t['tokens_per_s']:,.0f} tok/s", fmt_step_time(t["step_time_s"])]
        parts.append(f"{t['train_tokens']:,} tokens")
        if self.memory.peak_bytes:
            parts.append(f"peak {fmt_bytes(self.memory.peak_bytes)}")
        return " · ".join(parts)

    # -- evaluation lines: one per set, once its loss and its perplexity / generation event are in

    def _collect_evals(self, logs: dict, step: int) -> None:
        complete = []
        for key, value in rename_logs(logs, self.set_names).items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval":
                self._evals.setdefault(parts[1], {"@step": step})[parts[2]] = value
                if parts[2] == "perplexity":  # the eval callback's event, the last one of a set's evaluation
                    complete.append(parts[1])
        self._show_evals(complete)

    def _show_evals(self, names: list[str] | None = None) -> None:
        for name in list(self._evals) if names is None else names:
            metrics = self._evals.pop(name, None)
            if metrics:
                step = metrics.pop("@step")
                self._print(fmt_eval(name, step, metrics))

    def _print(self, text: str) -> None:
        if self.display is not None:
            self.display.print(text)


def find_progress(trainer) -> TrainProgress | None:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainProgress)), None)


def replace_hf_progress(trainer) -> None:
    """Remove HF's tqdm bar and its printed log dicts (ours show the same and more): whichever of
    ProgressCallback (tqdm), PrinterCallback (disable_tqdm) and the notebook bar the Trainer added."""
    from transformers import trainer as hf_trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in {ProgressCallback, PrinterCallback, hf_trainer.DEFAULT_PROGRESS_CALLBACK}:
        while any(isinstance(cb, cls) for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(cls)
