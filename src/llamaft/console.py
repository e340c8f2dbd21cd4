"""What llamaft shows in a terminal or a log, in one place: the libraries' noise policy and our console.

    quiet_libraries()          # once per command (cli.main) and per train(); calling it again changes nothing
    console = make_console()   # rich Console: a terminal as it is; a log file / CI wide and never wrapped

quiet_libraries() keeps what a user can act on and drops what they cannot:
- FutureWarnings about transformers' gradient → activation checkpointing rename: raised by calls that
  llamaft (TrainingArguments, fast path) and peft (`is_gradient_checkpointing`) make, not the user's
  code; matched by message and by transformers' module, so any other deprecation still shows.
- transformers' own tqdm bars ("Loading weights", "Writing model shards"): a few hundred
  milliseconds each, and in a log file a wall of carriage returns. huggingface_hub's download bars
  stay as they were: a first download of 16 GB must not look hung.
- transformers' logger at WARNING (its default), unless TRANSFORMERS_VERBOSITY says otherwise.
Warnings from llamaft itself and every other warning are left alone.

make_console(): in a terminal, rich's defaults; anywhere else (a file, a pipe, CI) a width of 200 so
that a rule's title is never cut at 80 columns. Both soft-wrap: a long command or path stays on one
line (the terminal wraps it for the eye; copying it gives the command back, without a newline inside).

The bottom layer (beside errors and paths): transformers is imported only inside quiet_libraries().
"""

from __future__ import annotations

import os
import warnings
from typing import IO

from rich.console import Console

WIDE = 200  # columns for a console that is not a terminal

# transformers >= 5.17 renamed gradient checkpointing to activation checkpointing; the old names warn
# ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead.").
CHECKPOINTING_RENAME = r"`(is_)?gradient_checkpointing(_enable|_disable|_kwargs)?` is deprecated and will be removed in v6"


def quiet_libraries() -> None:
    """Apply the policy above; idempotent (warnings.filterwarnings replaces an identical filter)."""
    warnings.filterwarnings("ignore", message=CHECKPOINTING_RENAME, category=FutureWarning, module=r"transformers(\.|$)")
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf_logging

    hub_bars_off = hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also switches huggingface_hub's bars off ...
    if not hub_bars_off:
        hub.enable_progress_bars()  # ... which stay as they were (downloads keep their progress)
    if not os.environ.get("TRANSFORMERS_VERBOSITY"):
        hf_logging.set_verbosity_warning()


def make_console(file: IO[str] | None = None, **kwargs) -> Console:
    """A rich Console for `file` (default: sys.stdout at the time of each write, so redirections and
    test capture work); not a terminal: WIDE columns. kwargs go to Console (e.g. stderr=True)."""
    kwargs.setdefault("soft_wrap", True)
    if not Console(file=file, **kwargs).is_terminal:
        kwargs.setdefault("width", WIDE)
    return Console(file=file, **kwargs)
