"""Trials in parallel: one worker process per GPU (CUDA_VISIBLE_DEVICES=i), all sharing the study in
SWEEP/study.db (Optuna over SQLite hands each worker its own next trial).

    python -m llamaft.sweep.worker SWEEP I    # what worker I runs (run.work in that process)

A worker dies with the coordinator (Linux: PR_SET_PDEATHSIG), so `kill -9` of `llamaft sweep` leaves
no orphan training on a GPU; Ctrl-C reaches every worker (one process group), each marks its trial
interrupted. A trial spans one GPU; trials over several GPUs each (DDP inside a trial) are not
implemented.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError, LlamaftError


def plan_workers(workers: str | int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: one GPU each (auto: every visible GPU); on a machine
    without CUDA, `workers` CPU processes (None: the environment is left as it is)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return [None] * (1 if workers == "auto" else int(workers))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")][:gpus] if visible else [str(i) for i in range(gpus)]
    n = gpus if workers == "auto" else int(workers)
    if n > gpus:
        raise ConfigError(f"sweep.workers: {n} workers but {gpus} GPU{'s' if gpus > 1 else ''} visible (one trial per GPU)")
    return ids[:n]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: workers then notice a dead coordinator only when their trial ends


def run_workers(sweep_dir: Path, devices: list[str | None]) -> None:
    """Start one worker per device and wait for all; a worker that failed is one LlamaftError."""
    procs = []
    for i, dev in enumerate(devices):
        env = dict(os.environ)
        if dev is not None:
            env["CUDA_VISIBLE_DEVICES"] = dev
        procs.append(subprocess.Popen([sys.executable, "-m", "llamaft.sweep.worker", str(sweep_dir), str(i)], env=env,
                                      preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None))
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C / SIGTERM of the coordinator: the workers stop their trials as interrupted
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    if any(code == 130 or code == 143 for code in codes):
        raise KeyboardInterrupt
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        raise LlamaftError(f"sweep worker {failed[0][0]} exited with code {failed[0][1]} (its error is printed above); "
                           f"finished trials are kept: llamaft sweep --resume {sweep_dir}")
