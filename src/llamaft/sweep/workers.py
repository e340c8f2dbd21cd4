"""Trials in parallel: one worker process per GPU, or per group of `sweep.gpus_per_trial` GPUs
(CUDA_VISIBLE_DEVICES=2,3), all sharing the study in SWEEP/study.db (Optuna over SQLite hands each
worker its own next trial). A worker trains a one-GPU trial itself and starts a trial of several
GPUs as that many processes (processes.py, like `llamaft train --nproc N`).

    python -m llamaft.sweep.worker SWEEP I    # what worker I runs (run.work in that process)

A worker dies with the coordinator, and a trial's processes with their worker (Linux:
PR_SET_PDEATHSIG), so `kill -9` of `llamaft sweep` leaves no orphan training on a GPU; Ctrl-C
reaches every worker (one process group), each marks its trial interrupted.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError, LlamaftError


def plan_workers(workers: str | int, per_trial: int = 1) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: a group of `per_trial` GPUs each (auto: as many groups as
    the visible GPUs make); on a machine without CUDA, `workers` CPU processes (None: the environment
    is left as it is; a trial of several processes then runs them with gloo)."""
    from ..train.launch import visible_gpus

    gpus = visible_gpus()
    if gpus == 0:
        return [None] * (1 if workers == "auto" else int(workers))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")][:gpus] if visible else [str(i) for i in range(gpus)]
    seen = f"{gpus} GPU{'s' if gpus > 1 else ''} visible"
    if per_trial > gpus:
        raise ConfigError(f"sweep.gpus_per_trial: {per_trial} GPUs per trial, but {seen}")
    if workers == "auto" and gpus % per_trial:
        raise ConfigError(f"sweep.gpus_per_trial: {per_trial} does not divide the {seen} ({gpus % per_trial} would "
                          f"stay idle); set sweep.workers: {gpus // per_trial}, or CUDA_VISIBLE_DEVICES")
    n = gpus // per_trial if workers == "auto" else int(workers)
    if n * per_trial > gpus:
        raise ConfigError(f"sweep.workers: {n} workers x {per_trial} GPU{'s' if per_trial > 1 else ''} per trial, but {seen}")
    return [",".join(ids[i * per_trial:(i + 1) * per_trial]) for i in range(n)]


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent dies (here: between fork and exec of a worker; processes.py:
    a trial's process itself)."""
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
                                      preexec_fn=die_with_parent if sys.platform.startswith("linux") else None))
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
