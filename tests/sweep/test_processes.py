"""Trials of several processes (sweep.gpus_per_trial: 2; on CPU two gloo processes per trial, DDP), on
test_sweep.py's tiny project: the pruner's decision on rank 0 stops both processes, every evaluation
reaches Optuna once, each trial's run directory says it ran in 2 processes; `kill -9` of the sweep
leaves none of a trial's processes behind. Each test starts real processes, bounded by a timeout."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llamaft.cli import main
from distributed_helpers import TIMEOUT, _env, _processes_naming
from sweep_helpers import _project, _trials, _write
from train_helpers import strict_json


@pytest.fixture
def two_threads_in_all(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the two processes of a trial share the 2 cores


@pytest.mark.multiprocess
def test_each_trial_trains_in_two_processes_and_rank_0_alone_reports(tmp_path, capsys, two_threads_in_all):
    base = _project(tmp_path, max_steps=2, eval_every=1)
    spec = _write(tmp_path / "sweep.yaml", {
        "objective": "eval/alpha/loss", "method": "grid", "gpus_per_trial": 2, "pruner": {"median": {"startup_trials": 1}},
        "space": {"train.learning_rate": [0.1, 10.0]}, "start_with": [{"train.learning_rate": lr} for lr in (0.1, 10.0)]})
    sweep = tmp_path / "sweep"
    # a hang (ranks that disagree on stopping wait in DDP's next all-reduce) fails the trial after TIMEOUT
    hang = threading.Timer(TIMEOUT, lambda: [os.kill(pid, signal.SIGKILL) for pid in _processes_naming(str(sweep))])
    hang.start()
    try:
        assert main(["sweep", str(base), str(spec), "--out", str(sweep)]) == 0
    finally:
        hang.cancel()
    assert "each trial trains in 2 processes (gloo, on CPU)" in capsys.readouterr().out
    rows = {r["trial"]: r for r in strict_json((sweep / "results.json").read_text())["trials"]}
    assert [(n, rows[n]["state"]) for n in sorted(rows)] == [(0, "completed"), (1, "pruned")]
    trials = _trials(sweep)
    for t in trials:
        summary = strict_json((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
        assert (summary["batch"]["processes"], summary["batch"]["strategy"]) == (2, "ddp")
        assert summary["batch"]["gradient_accumulation"] == 1  # 2 configured, shared out between the processes
    assert sorted(trials[0].intermediate_values) == [1, 2] and trials[0].value == rows[0]["objective"]
    # lr 10 blows up: pruned at its first evaluation, and both processes stopped there (else DDP would hang)
    pruned = strict_json((Path(rows[1]["run_dir"]) / "summary.json").read_text())
    assert list(trials[1].intermediate_values) == [1] and (pruned["status"], pruned["steps"]) == ("pruned", 1)
    assert "pruned at step 1" in rows[1]["reason"] and pruned["pruned"]["reason"] == rows[1]["reason"]


@pytest.mark.multiprocess
def test_kill_9_of_the_sweep_leaves_no_process_of_a_trial(tmp_path):
    base = _project(tmp_path, max_steps=100000, eval_every=0)  # far longer than the test
    spec = _write(tmp_path / "sweep.yaml", {"objective": "eval/alpha/loss", "method": "grid", "gpus_per_trial": 2,
                                            "pruner": "none", "space": {"train.learning_rate": [0.1]}})
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "llamaft", "sweep", str(base), str(spec), "--out", str(sweep)],
                            env={**_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (sweep / "trial-0000" / "metrics.jsonl").is_file():  # both are training
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        ranks = [p for p in _processes_naming(str(sweep)) if p != proc.pid]
        assert len(ranks) == 2, "the trial runs in two processes of its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and _processes_naming(str(sweep)):
            time.sleep(0.2)
        assert _processes_naming(str(sweep)) == []
    finally:
        for pid in _processes_naming(str(sweep)):
            os.kill(pid, signal.SIGKILL)
