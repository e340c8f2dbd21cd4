"""`llamaft train CFG --nproc N`: the same command in N processes on this machine, through torch's
own launcher (torch.distributed.run, what `torchrun` runs), called in this process so that the exit
code and the output stay ours:

    llamaft train run.yaml --nproc 2     ==  torchrun --standalone --nproc-per-node 2 -m llamaft train run.yaml

- the processes are ended together: one that fails makes the launcher stop the others (SIGTERM, then
  SIGKILL after its 30 s); Ctrl-C or SIGTERM here reaches every process (each rank stops like a
  single run: rank 0 writes summary.json "interrupted" and keeps its complete checkpoints);
- the exit code is the one of the process that failed first (2 bad input, 3 diverged, 130 / 143
  interrupted; 128 + N when it was killed by signal N, as a shell reports it). That process printed
  its own line; the launcher's log records are silenced (the same facts, a screen long), and only a
  process killed by a signal, which printed nothing, gets one line here.

Nothing in the processes depends on this module: they read RANK / WORLD_SIZE / LOCAL_RANK
(distributed.py), so torchrun and accelerate launch start the same run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

PROCESS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def launched() -> bool:
    """Was this process started by a launcher (torchrun, accelerate launch, `--nproc`)?"""
    return any(name in os.environ for name in PROCESS_ENV)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes(requested: int | None) -> int:
    """How many processes `llamaft train` starts: --nproc, else every visible GPU when there are
    several, else 1. Under a launcher: none (it started them), and a --nproc that differs is an error."""
    from ..errors import LlamaftError

    if launched():
        size = int(os.environ.get("WORLD_SIZE", 1))
        if requested not in (None, size):
            raise LlamaftError(f"--nproc {requested}, but a launcher already started {size} processes "
                               f"(WORLD_SIZE={size}); leave out --nproc under torchrun / accelerate launch")
        return 1
    if requested is None:
        gpus = visible_gpus()
        return gpus if gpus > 1 else 1
    if requested < 1:
        raise LlamaftError(f"--nproc {requested}: the process count must be 1 or more")
    gpus = visible_gpus()
    if gpus and requested > gpus:
        raise LlamaftError(f"--nproc {requested}, but {gpus} GPU(s) are visible (one process per GPU); "
                           f"use --nproc {gpus} or fewer, or set CUDA_VISIBLE_DEVICES")
    return requested


def launch(argv: list[str], n: int, module: str = "llamaft") -> int:
    """`python -m MODULE ARGV` (default: `llamaft ARGV`) in n processes; returns the exit code (see the
    module docstring). This process's signal handlers are back afterwards (a sweep's worker launches
    one trial after another; the launcher installs its own)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Threads per process: the cores shared out (torchrun would set 1 and print a banner about it).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    _silence_launcher_log()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={n}", "--module", module, *argv]))
    except ChildFailedError as err:
        return _exit_code(err)
    except SignalException as err:  # Ctrl-C / SIGTERM here: the launcher passed it on to every process
        return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(err.sigval, 128 + int(err.sigval))
    finally:
        if threading.current_thread() is threading.main_thread():  # where the launcher installed its own
            for sig, handler in handlers.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 0


def _silence_launcher_log() -> None:
    """torch's elastic modules give each logger its own level (LOGLEVEL, default WARNING): the parent's
    level would not reach them, so every one that exists once torch.distributed.run is imported is set."""
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _exit_code(err) -> int:
    """The first failure's code; a process killed by a signal gets one line. The launcher stamps
    failures in whole seconds, and the others follow the cause within milliseconds (a lost peer ends
    their next collective: exit 1; the launcher's SIGTERM: 143), so within one second the cause is the
    likeliest: a kill from outside (kill -9, the OOM killer), then an error of ours (2, 3), then a crash."""
    rank = min(err.failures, key=lambda r: (err.failures[r].timestamp, _follower(err.failures[r].exitcode), r))
    failure = err.failures[rank]
    code = failure.exitcode
    if code >= 0:
        return code
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    print(f"llamaft train: error: process {rank} (pid {failure.pid}) was killed by {name}; the others were stopped. "
          "Continue from the last complete checkpoint with train.resume=true", file=sys.stderr)
    return 128 - code


def _follower(code: int) -> int:
    """0: a cause; higher: likelier to have followed another process's failure."""
    stopped = {-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT}
    if code in stopped:
        return 3
    if code == 1:  # a crash, or a lost peer (distributed.SharedError, or DDP's own all-reduce)
        return 2
    return 0 if code < 0 else 1
