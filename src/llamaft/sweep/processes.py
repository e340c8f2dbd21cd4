"""A trial in several processes (sweep.gpus_per_trial: N > 1). The worker that holds the Optuna trial
starts N training processes the way `llamaft train --nproc N` does (train/launch.py, torch's own
launcher: DDP or FSDP2 over the worker's GPUs as distributed.strategy says; gloo on CPU), each running

    python -m llamaft.sweep.processes SWEEP NUMBER      # under torch.distributed.run

Every process builds the trial's config from its values in the study and trains it (trial.train_trial:
rank 0 reads the data and hands it on, a bad row stops them all, train/distributed.py). Rank 0 alone
talks to Optuna: it reports each evaluation and asks the pruner, and its decision to stop is every
rank's (train/distributed.wait_for_main); it notes how the trial ended (user attrs). The worker then
tells Optuna the outcome, once (study.optimize), from the exit code and what rank 0 noted.

The launcher starts the processes in sessions of their own, out of reach of a signal to the worker's
group: each asks to die with its parent, the worker (PR_SET_PDEATHSIG), so `kill -9` of the sweep
(whose workers die with it) leaves none training.
"""

from __future__ import annotations

import os
import signal
import sys

PARENT = "LLAMAFT_SWEEP_WORKER"  # the worker's pid, as its trial's processes must find it


def train_in_processes(trial, sweep) -> str | None:
    """The trial in sweep.spec.gpus_per_trial processes. Returns why the pruner stopped it (None: it ran
    to the end); raises optuna.TrialPruned (diverged), KeyboardInterrupt, LlamaftError (failed)."""
    import optuna

    from ..errors import LlamaftError
    from ..train.launch import launch

    os.environ[PARENT] = str(os.getpid())
    code = launch([str(sweep.dir), str(trial.number)], sweep.spec.gpus_per_trial, module=__name__)
    # what rank 0 noted, from the study (this process's Trial holds the attributes as it set them)
    reason = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number).user_attrs.get("reason")
    if code in (130, 143):
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("reason", "interrupted: the sweep stopped during this trial")
        # the launcher caught the signal; this process's own handler now gets it (`llamaft sweep`: exit 130 / 143)
        signal.raise_signal(signal.SIGINT if code == 130 else signal.SIGTERM)
        raise KeyboardInterrupt
    if code == 3:
        raise optuna.TrialPruned(reason)
    if code != 0:
        reason = reason or f"its {sweep.spec.gpus_per_trial} processes stopped with exit code {code} (see the error above)"
        trial.set_user_attr("reason", reason)
        raise LlamaftError(reason)
    return reason  # a trial that ran to its end has none; a pruned one says why


def _terminated(_signum, _frame):
    raise KeyboardInterrupt  # as in `llamaft train`: rank 0 writes summary.json "interrupted"


def main(argv: list[str]) -> int:
    """One process of trial NUMBER of SWEEP; exit codes as `llamaft train` (0, 2, 3 diverged, 130)."""
    from ..console import quiet_libraries
    from ..errors import LlamaftError
    from .workers import die_with_parent

    die_with_parent()
    if str(os.getppid()) != os.environ.get(PARENT):  # the worker died before this process asked to die with it
        return 137
    signal.signal(signal.SIGTERM, _terminated)
    quiet_libraries()
    try:
        return _train(argv[0], int(argv[1]))
    except LlamaftError as err:
        if not err.quiet:  # another rank's own error (rank 0's is in the study)
            print(f"llamaft sweep: error: trial {argv[1]}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _train(sweep_dir: str, number: int) -> int:
    import optuna

    from ..errors import LlamaftError
    from ..train.distributed import world
    from .run import load_sweep
    from .study import STUDY_NAME, open_study, rdb_storage
    from .trial import train_trial, trial_config, trial_dir

    sweep = load_sweep(sweep_dir)
    study = open_study(sweep.dir, sweep.spec)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    raw = trial_config(sweep.base, sweep.spec, frozen.params, trial_dir(sweep.dir, number))
    trial = None
    if world().main:  # the running trial itself, as Optuna's own objective would get it
        storage = rdb_storage(sweep.dir)
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(STUDY_NAME), number)
        trial = optuna.trial.Trial(study, trial_id)
    try:
        train_trial(trial, number, raw, sweep, sweep.set_names)
    except optuna.TrialPruned:  # diverged (noted by rank 0)
        return 3
    except LlamaftError as err:
        err.quiet = err.quiet or trial is not None  # rank 0 noted it in the study: the worker says it
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
