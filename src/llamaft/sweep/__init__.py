"""`llamaft sweep`: hyperparameter search over any config key on Optuna; every trial an ordinary run.

    llamaft sweep run.yaml sweep.yaml            # or a `sweep:` section in run.yaml
    llamaft sweep --resume runs/run-sweep        # after a crash, Ctrl-C or kill -9

    spec.py      the spec (space, objective, method, budget, pruner), checked before anything trains
    study.py     Optuna: sampler, pruner, SQLite study, budget, interrupted trials on resume
    trial.py     one trial: base config + values -> train() into SWEEP/trial-NNNN, pruning callback
    run.py       run_sweep / resume_sweep: preflight, the trial loop, the sweep directory
    workers.py   one worker process per GPU or group of GPUs (worker.py is what each runs)
    processes.py a trial in several processes (sweep.gpus_per_trial), like `llamaft train --nproc N`
    command.py   the CLI command: reads the config and the spec file
    results.py   results.json / results.md / best.yaml;  report.py  plots + report.md

It sits above train and eval (it calls them) and below the CLI; nothing below imports it.
"""

__all__ = ["run_sweep", "resume_sweep"]


def __getattr__(name: str):
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
