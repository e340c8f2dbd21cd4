"""The Optuna side of a sweep: the study in SWEEP/study.db (SQLite), its sampler and pruner, the budget,
and what a resumed sweep does with the trials its killed predecessor left running.

Optuna does the search and the pruning (samplers: TPESampler, RandomSampler, GridSampler; pruners:
MedianPruner, SuccessiveHalvingPruner); llamaft only maps the spec onto them. Samplers and pruners
are not stored in the database: every process of the sweep (the coordinator, each GPU worker, a
resumed sweep) builds them again from the spec, seeded alike.

Trial bookkeeping, in each trial's user attributes: `run_dir`, `config` (the swept keys' values),
`worker` (pid) and `devices` (CUDA_VISIBLE_DEVICES), `reason` (why it was pruned or failed),
`interrupted` (the sweep stopped during it: Ctrl-C, SIGTERM, kill -9), `retry_of` (the interrupted
trial whose values this one runs again). The budget (`trials`) counts finished trials, interrupted
ones excepted: they are retried, not counted.
"""

from __future__ import annotations

from pathlib import Path

from .spec import Spec

STUDY_DB = "study.db"
STUDY_NAME = "llamaft-sweep"


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours (run.py); no duplicate logs
    return optuna


def sampler(spec: Spec, offset: int = 0):
    """offset: added to the seed, so that parallel workers and a resumed sweep do not draw the values
    the first process drew (the same seed twice would propose the same random trials again)."""
    optuna = _optuna()
    seed = spec.seed + offset
    if spec.method == "grid":
        return optuna.samplers.GridSampler(spec.grid(), seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # few trials: start modelling early (Optuna's default waits 10 random trials)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.trials // 3)))


def pruner(spec: Spec):
    optuna = _optuna()
    kind, opts = spec.pruner["kind"], spec.pruner
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=opts.get("startup_trials", 2),
                                           n_warmup_steps=opts.get("warmup_steps", 0))
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=opts.get("min_resource", "auto"),
                                                      reduction_factor=opts.get("reduction_factor", 3))
    return optuna.pruners.NopPruner()


def storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{(Path(sweep_dir) / STUDY_DB).resolve()}"


def rdb_storage(sweep_dir: Path):
    from optuna.storages import RDBStorage

    # SQLite locks the whole file: workers wait for each other's writes (seconds at most) instead of failing
    return RDBStorage(storage_url(sweep_dir), engine_kwargs={"connect_args": {"timeout": 60}})


def open_study(sweep_dir: Path, spec: Spec, *, create: bool = False, worker: int = 0):
    """The sweep's study (created with `create`); several processes share it through SQLite. Its
    sampler is seeded with the spec's seed, shifted by the worker's index and the trials so far."""
    optuna = _optuna()
    storage = rdb_storage(sweep_dir)
    if create:
        return optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=spec.direction,
                                   sampler=sampler(spec), pruner=pruner(spec), load_if_exists=False)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler(spec), pruner=pruner(spec))
    study.sampler = sampler(spec, offset=1000 * worker + len(study.get_trials(deepcopy=False)))
    return study


def counted(study) -> int:
    """Finished trials that use up the budget (interrupted ones are retried instead)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return sum(1 for t in done if not t.user_attrs.get("interrupted"))


def running(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def recover_interrupted(sweep_dir: Path, study) -> list[int]:
    """Trials a killed sweep left RUNNING are failed as interrupted, and every interrupted trial not
    yet retried is queued again with its values (Optuna's enqueue_trial). Only while no other process
    of the sweep runs (run.py holds the sweep's lock). Returns the numbers queued again."""
    from optuna.trial import TrialState

    db = rdb_storage(sweep_dir)
    study_id = db.get_study_id_from_name(STUDY_NAME)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = db.get_trial_id_from_study_id_trial_number(study_id, t.number)
        db.set_trial_user_attr(trial_id, "interrupted", True)
        db.set_trial_user_attr(trial_id, "reason", "interrupted: the sweep stopped during this trial")
        study.tell(t.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    again = [t for t in trials if t.user_attrs.get("interrupted") and t.number not in retried]
    for t in again:
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
    return [t.number for t in again]


class Budget:
    """Optuna callback: stop once the finished (and still running) trials reach the budget. Every
    worker checks after each of its trials, so N workers together run at most `trials`."""

    def __init__(self, trials: int):
        self.trials = trials

    def __call__(self, study, _trial) -> None:
        if counted(study) + running(study) >= self.trials:
            study.stop()
