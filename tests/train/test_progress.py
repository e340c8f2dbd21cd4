"""train/progress.py: exact token counts, step times without evaluation, memory peaks, what the log
events get, and the lines a log file shows (driven through the callback's events with a fake clock)."""

import io
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from llamaft.console import make_console
from llamaft.data.collate import Collator
from llamaft.data.pack import flatten
from llamaft.train.progress_display import fmt_bytes
from llamaft.train.progress import MemoryPeak, TokenCounter, TrainProgress, batch_tokens, rss_peak_bytes


class Toy(torch.nn.Module):
    """Takes a batch like the Trainer passes one (model(**inputs)); the hook only looks at the inputs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return (input_ids.float() * self.w).sum()


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# Two examples of 3 and 2 tokens, right-padded to 3: 5 real tokens and one pad.
PADDED = Collator(pad_id=0)([{"input_ids": [7, 8, 9]}, {"input_ids": [7, 8]}])
# 4 and 1 tokens, padded to 4: 5 real tokens, 3 pads.
PADDED_2 = Collator(pad_id=0)([{"input_ids": [7, 8, 9, 10]}, {"input_ids": [7]}])
# Packed: 3 + 2 tokens in one row, no padding and no attention_mask.
PACKED = flatten([{"input_ids": [7, 8, 9]}, {"input_ids": [7, 8]}])


def test_batch_tokens_counts_the_ones_of_the_mask_or_every_id_of_a_packed_row():
    assert PADDED["input_ids"].numel() == 6 and int(batch_tokens(PADDED)) == 5
    assert PADDED_2["input_ids"].numel() == 8 and int(batch_tokens(PADDED_2)) == 5
    assert "attention_mask" not in PACKED and int(batch_tokens(PACKED)) == 5
    padded_row = flatten([{"input_ids": [7, 8, 9]}, {"input_ids": [7, 8]}], multiple=8, pad_id=0)  # fast.pack_multiple
    assert padded_row["input_ids"].numel() == 8 and int(batch_tokens(padded_row, pad_id=0)) == 5


def test_the_counter_leaves_the_pad_segment_of_padded_packed_rows_out():
    model, counter = Toy().train(), TokenCounter(pad_id=0)
    counter.attach(model)
    model(**flatten([{"input_ids": [7, 8, 9]}, {"input_ids": [7, 8]}], multiple=8, pad_id=0))
    assert counter.take() == 5


def test_the_counter_sees_training_forwards_only():
    model, counter = Toy().train(), TokenCounter()
    counter.attach(model)
    model(**PADDED)
    model(**PADDED_2)  # one optimizer step of two accumulated micro-batches
    with torch.no_grad():
        model(**PADDED)  # evaluation: no grad
    model.eval()
    model(**PADDED)  # generation: eval mode
    model.train()
    assert counter.take() == 10 and counter.take() == 0
    model(PACKED["input_ids"])  # positional input_ids
    counter.detach()
    model(**PADDED)  # detached: nothing counted any more
    assert counter.take() == 5 and counter.total == 15


def _events(console=None):
    clock, model = Clock(), Toy().train()
    cb = TrainProgress(["alpha"], console=console or make_console(io.StringIO()), clock=clock)
    args, state, control = SimpleNamespace(device=torch.device("cpu")), TrainerState(), TrainerControl()
    state.max_steps = 4
    cb.on_train_begin(args, state, control, model=model)
    return cb, clock, model, args, state, control


def _step(cb, clock, model, args, state, control, batches, seconds):
    for batch in batches:
        model(**batch)
    clock.t += seconds
    state.global_step += 1
    cb.on_step_end(args, state, control)


def test_log_events_get_tokens_per_second_and_step_time_without_evaluation_time():
    cb, clock, model, args, state, control = _events()
    _step(cb, clock, model, args, state, control, [PADDED, PADDED_2], seconds=2.0)
    logs = {"loss": 1.5}
    cb.on_log(args, state, control, logs=logs)
    assert logs["tokens_per_s"] == 5.0 and logs["step_time_s"] == 2.0  # 10 tokens in 2 s
    assert logs["mem_peak_gib"] > 0 and "cuda_max_allocated_gib" not in logs

    clock.t += 8.0  # an evaluation with generation: 8 s, not step time
    cb.on_log(args, state, control, logs={"eval_alpha_loss": 1.2, "eval_alpha_runtime": 0.5})
    _step(cb, clock, model, args, state, control, [PACKED], seconds=1.0)
    clock.t += 3.0  # a checkpoint
    cb.on_save(args, state, control)
    _step(cb, clock, model, args, state, control, [PADDED], seconds=1.5)
    logs = {"loss": 1.0}
    cb.on_log(args, state, control, logs=logs)
    assert logs["tokens_per_s"] == 4.0 and logs["step_time_s"] == 1.25  # 5 + 5 tokens in 1 + 1.5 s
    t = cb.throughput()
    assert (t["train_tokens"], t["steps"], t["train_time_s"], t["tokens_per_s"], t["step_time_s"]) == (20, 3, 4.5, 4.4, 1.5)
    assert t["wall_time_s"] == 15.5 and t["device"] == "cpu" and "ru_maxrss" in t["memory_measured"]


def test_a_log_file_gets_one_plain_line_per_log_and_one_per_evaluated_set():
    out = io.StringIO()
    cb, clock, model, args, state, control = _events(make_console(out))
    _step(cb, clock, model, args, state, control, [PADDED, PADDED_2], seconds=2.0)
    cb.on_log(args, state, control, logs={"loss": 1.5})
    cb.on_log(args, state, control, logs={"eval_alpha_loss": 1.25, "eval_alpha_runtime": 0.5})
    cb.on_log(args, state, control, logs={"eval_alpha_perplexity": 3.49, "eval_alpha_exact_match": 0.375,
                                         "eval_alpha_samples": 8, "eval_alpha_prompts_truncated": 0})
    _step(cb, clock, model, args, state, control, [PADDED], seconds=1.0)  # not a logging step: no line
    cb.on_train_end(args, state, control)
    peak = fmt_bytes(rss_peak_bytes())  # MiB or GiB: this process's real peak, which a long test session grows
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        f"step 1/4 · loss 1.5 · 5 tok/s · 2.00 s/step · ETA 0:06 · peak {peak}",
        "eval alpha @ step 1 · loss 1.25 · perplexity 3.49 · exact_match 0.375 · generation on 8 rows",
        f"trained 2 steps in 0:03 · 5 tok/s · 1.50 s/step · 15 tokens · peak {peak}",
    ]


def test_a_terminal_gets_a_bar_that_ends_on_its_own_line():
    out = io.StringIO()
    console = make_console(out, force_terminal=True, force_interactive=True, width=150)
    cb, clock, model, args, state, control = _events(console)
    _step(cb, clock, model, args, state, control, [PADDED, PADDED_2], seconds=2.0)
    cb.on_log(args, state, control, logs={"loss": 1.5})
    cb.close()  # what the recipe does on an interrupt
    text = out.getvalue()
    assert "step 1/4 · loss 1.5 · 5 tok/s · 2.00 s/step · ETA 0:06" in text and "━" in text
    assert text.replace("\x1b[?25h", "").endswith("\n") and cb.display.progress is None  # (after the cursor is shown again)


def test_only_the_first_process_prints():
    out = io.StringIO()
    clock, model = Clock(), Toy().train()
    cb = TrainProgress(console=make_console(out), clock=clock)
    state = TrainerState(is_world_process_zero=False, max_steps=2)
    args, control = SimpleNamespace(device=torch.device("cpu")), TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    _step(cb, clock, model, args, state, control, [PADDED], seconds=1.0)
    logs = {"loss": 1.0}
    cb.on_log(args, state, control, logs=logs)
    cb.on_train_end(args, state, control)
    assert out.getvalue() == "" and logs["tokens_per_s"] == 5.0  # every process still counts its own


def test_cuda_memory_peak_is_the_device_level_max_over_samples(monkeypatch):
    used = iter([(6 * 2**30, 10 * 2**30), (3 * 2**30, 10 * 2**30), (5 * 2**30, 10 * 2**30)])  # (free, total)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: next(used))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2**30)
    mem = MemoryPeak("cuda:0")
    for _ in range(3):
        mem.sample()
    assert mem.peak_bytes == 7 * 2**30 and mem.allocated_bytes == 2 * 2**30  # total - free at its largest
    assert mem.reserved_bytes == 3 * 2**30 and "mem_get_info" in mem.how()


def test_cuda_memory_peak_thread_sees_a_peak_between_steps(monkeypatch):
    """The thread samples while the step runs: a peak that is gone by the step's end still counts."""
    import threading

    seen = threading.Event()
    used = iter([9 * 2**30] + [2 * 2**30] * 10**6)  # the peak comes once, mid-step

    def mem_get_info(device=None):
        seen.set()
        return 10 * 2**30 - next(used), 10 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    mem = MemoryPeak("cuda:0", interval=0.001)
    mem.start()
    assert seen.wait(5)
    mem.stop()
    assert mem.peak_bytes == 9 * 2**30 and mem._thread is None
    MemoryPeak("cpu").start()  # no thread off CUDA


def test_cpu_memory_peak_is_the_process_peak_rss():
    mem = MemoryPeak("cpu")
    mem.sample()
    assert mem.peak_bytes == rss_peak_bytes() > 10 * 2**20 and mem.allocated_bytes is None


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_hf_bars_and_printed_log_dicts_are_removed(tmp_path, disable_tqdm):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from llamaft.train.progress import replace_hf_progress

    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=disable_tqdm, use_cpu=True, report_to="none")
    trainer = Trainer(model=Toy(), args=args)
    kinds = lambda: {type(cb) for cb in trainer.callback_handler.callbacks}
    assert kinds() & {ProgressCallback, PrinterCallback}  # the control: HF adds one of them
    replace_hf_progress(trainer)
    assert not kinds() & {ProgressCallback, PrinterCallback}
