"""One worker process of a parallel sweep, started by workers.py as

    python -m llamaft.sweep.worker SWEEP INDEX

runs trials of SWEEP until the budget is used up (INDEX shifts its sampler's seed: workers do not
propose the same values). Exit codes as `llamaft`: 0, 2 (its error printed as one line), 130 / 143
interrupted."""

from __future__ import annotations

import signal
import sys


def _terminated(_signum, _frame):
    raise KeyboardInterrupt  # the trial is saved as interrupted (train/recipe.py), then marked so in the study


def main(argv: list[str]) -> int:
    from ..console import quiet_libraries
    from ..errors import LlamaftError
    from .run import load_sweep, work

    signal.signal(signal.SIGTERM, _terminated)
    quiet_libraries()
    try:
        work(load_sweep(argv[0]), worker=int(argv[1]))
    except LlamaftError as err:
        print(f"llamaft sweep: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
