"""How train/progress.py's numbers look: the status line, the eval line, and where they go (a rich
bar in a terminal, plain lines anywhere else).

    step 6/12 · loss 0.9912 · 1,234 tok/s · 3.05 s/step · ETA 0:18 · peak 1.2 GiB
    eval alpha @ step 6 · loss 1.02 · perplexity 2.77 · exact_match 0.375 · stops_on_eos 1 · generation on 8 rows
    trained 12 steps in 0:41 · 1,180 tok/s · 3.12 s/step · 14,160 tokens · peak 1.2 GiB
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
# Left out of the eval line: the trainer's timings and counts that only matter in the report.
_NOT_SHOWN = {"runtime_s", "samples_per_second", "steps_per_second", "samples", "prompts_truncated", "mean_new_tokens"}


@dataclass
class Status:
    """One line (or the bar's text): None fields are left out."""

    step: int
    total: int
    loss: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    eta_s: float | None = None
    peak_bytes: int | None = None


def fmt_duration(seconds: float) -> str:
    """0:18, 12:05, 1:02:03."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def fmt_bytes(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024**2:.0f} MiB"


def fmt_step_time(s: float) -> str:
    return f"{s:.1f} s/step" if s >= 10 else f"{s:.2f} s/step"


def fmt_status(s: Status) -> str:
    """`step 6/12 · loss 0.9912 · 1,234 tok/s · 3.05 s/step · ETA 0:18 · peak 1.2 GiB`"""
    parts = [f"step {s.step}/{s.total}"]
    if s.loss is not None:
        parts.append(f"loss {s.loss:.4g}")
    if s.tokens_per_s is not None:
        parts.append(f"{s.tokens_per_s:,.0f} tok/s")
    if s.step_time_s is not None:
        parts.append(fmt_step_time(s.step_time_s))
    if s.eta_s is not None:
        parts.append(f"ETA {fmt_duration(s.eta_s)}")
    if s.peak_bytes:
        parts.append(f"peak {fmt_bytes(s.peak_bytes)}")
    return " · ".join(parts)


def fmt_eval(set_name: str, step: int, metrics: dict) -> str:
    """`eval alpha @ step 6 · loss 1.02 · perplexity 2.77 · exact_match 0.375 · generation on 8 rows`"""
    parts = [f"eval {set_name} @ step {step}"]
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
              if k not in _NOT_SHOWN and v is not None]
    if metrics.get("samples"):
        parts.append(f"generation on {metrics['samples']} rows")
    if metrics.get("prompts_truncated"):
        parts.append(f"{metrics['prompts_truncated']} prompts cut")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------
# Where the lines go


class Lines:
    """Not a terminal: one plain line per logging step, nothing in between (no carriage returns)."""

    def __init__(self, console):
        self.console = console

    def start(self, total: int) -> None:
        pass

    def step(self, status: Status) -> None:
        pass

    def logged(self, status: Status) -> None:
        self.print(fmt_status(status))

    def print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        pass


class Bar(Lines):
    """A terminal: one rich bar, updated every step; other output (eval lines, warnings) prints above it."""

    def __init__(self, console):
        super().__init__(console)
        self.progress = None
        self.task = None

    def start(self, total: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(BarColumn(bar_width=30), TextColumn("{task.description}"), console=self.console,
                                 refresh_per_second=4)
        self.task = self.progress.add_task(fmt_status(Status(0, total)), total=total)
        self.progress.start()

    def step(self, status: Status) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=status.step, total=status.total, description=fmt_status(status))

    def logged(self, status: Status) -> None:
        self.step(status)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()  # the bar's last state stays on screen, the cursor on a line of its own
            self.progress = None


def make_display(console) -> Lines:
    """A bar where someone watches (an interactive terminal), plain lines anywhere else."""
    return Bar(console) if console.is_interactive else Lines(console)
