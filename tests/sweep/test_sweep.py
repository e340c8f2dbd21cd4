"""`llamaft sweep` end to end on a tiny random Llama (CPU), on a task where the learning rate matters
visibly: every answer is the same three words, so full fine-tuning at lr 0.1 learns it in 8 steps
(eval loss ~0.5), 1e-4 does not move (~4.16 = ln 64), 10 blows up (~1000).

One in-process sweep (grid, median pruner) is looked at by several tests; a second sweep runs in a
child process with 2 worker processes, is killed with SIGKILL mid-trial and resumed."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from llamaft.cli import main
from llamaft.config import load_config
from sweep_helpers import ROWS, _project, _trials, _write
from train_helpers import InjectNaNLoss, strict_json

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# one sweep in this process: lr grid, median pruner, a diverging trial, the shared data cache

LRS = [1e-4, 10.0, 0.1, 1e4]  # run in this order (start_with); 1e4 gets a NaN loss injected at step 2


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    from llamaft.data import chat
    from llamaft.sweep import trial as trial_module

    root = tmp_path_factory.mktemp("grid")
    base = _project(root)
    spec = _write(root / "sweep.yaml", {
        "objective": "eval/alpha/loss", "method": "grid", "pruner": {"median": {"startup_trials": 1}},
        "space": {"train.learning_rate": LRS}, "start_with": [{"train.learning_rate": lr} for lr in LRS]})
    encoded, real_encode, real_train = [], chat.encode, trial_module.train

    def train_with_nan(cfg, *, callbacks=(), **kw):  # a real divergence, at a chosen step
        extra = [InjectNaNLoss([2])] if cfg.train.learning_rate == 1e4 else []
        return real_train(cfg, callbacks=[*callbacks, *extra], **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chat, "encode", lambda conv, *a, **k: encoded.append(conv.where) or real_encode(conv, *a, **k))
        mp.setattr(trial_module, "train", train_with_nan)
        code = main(["sweep", str(base), str(spec), "--out", str(root / "sweep")])
    assert code == 0
    results = strict_json((root / "sweep" / "results.json").read_text())
    return root / "sweep", results, {r["config"]["train.learning_rate"]: r for r in results["trials"]}, encoded


def test_sweep_finds_the_learning_rate_that_learns(grid_sweep):
    sweep, results, by_lr, _ = grid_sweep
    assert results["best"]["config"] == {"train.learning_rate": 0.1}
    assert 0.01 <= results["best"]["config"]["train.learning_rate"] <= 0.3
    assert results["best"]["objective"] < 1.0 < by_lr[1e-4]["objective"]
    # the table: completed by objective first, then pruned
    assert [r["state"] for r in results["trials"]] == ["completed", "completed", "pruned", "pruned"]
    assert [r["trial"] for r in results["trials"]][:2] == [2, 0]
    table = (sweep / "results.md").read_text().splitlines()
    assert table[0].startswith("| trial | state | train.learning_rate | eval/alpha/loss (min) |") and "tokens/s" in table[0]
    assert table[2].startswith("| 2 | completed | 0.1 | ")
    # each trial is an ordinary run directory whose config.yaml holds its value
    for lr, row in by_lr.items():
        assert load_config(Path(row["run_dir"]) / "config.yaml", snapshot=True).train.learning_rate == lr


def test_median_pruner_stops_a_trial_that_blows_up(grid_sweep):
    _, _, by_lr, _ = grid_sweep
    row = by_lr[10.0]
    assert row["state"] == "pruned" and row["objective_step"] == 2 and row["objective"] > 100
    assert "median pruner" in row["reason"] and "pruned at step 2" in row["reason"]
    summary = strict_json((Path(row["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["steps"] == 2
    assert summary["pruned"]["reason"] == row["reason"]
    assert "| status | pruned |" in (Path(row["run_dir"]) / "report.md").read_text()


def test_a_diverging_trial_is_recorded_with_its_reason_and_the_sweep_goes_on(grid_sweep):
    sweep, results, by_lr, _ = grid_sweep
    row = by_lr[1e4]
    assert row["state"] == "pruned" and row["reason"].startswith("diverged: training stopped at step 2: the loss is nan")
    assert strict_json((Path(row["run_dir"]) / "summary.json").read_text())["status"] == "stopped_nonfinite"
    assert len(results["trials"]) == len(LRS)


def test_data_is_tokenized_once_and_shared_by_every_trial(grid_sweep):
    sweep, _, _, encoded = grid_sweep
    assert len(encoded) == sum(ROWS.values()), "each row encoded once for the whole sweep"
    entries = sorted(p.name.split("-")[0] for p in (sweep / "cache").iterdir())
    assert entries == ["rows", "tokens"]


def test_report_plots_and_best_yaml_retrains_the_best_trial(grid_sweep):
    from llamaft.train import train

    sweep, results, _, _ = grid_sweep
    report = (sweep / "report.md").read_text()
    assert "**Best: trial 2**" in report and f"llamaft train {sweep / 'best.yaml'}" in report
    for plot in ("objective_vs_train.learning_rate.png", "learning_curves.png"):
        assert (sweep / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    cfg = load_config(sweep / "best.yaml")
    assert cfg.train.learning_rate == 0.1 and Path(cfg.train.output_dir) == (sweep / "best").resolve()
    run = train(cfg)
    again = strict_json((run / "summary.json").read_text())["eval"]["alpha"]["loss"]
    assert again == pytest.approx(results["best"]["objective"], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 2 worker processes; one killed with SIGKILL mid-trial; the sweep resumed


def _kill_a_worker_mid_trial(sweep: Path, seen: dict, limit: float = 300) -> None:
    """SIGKILL the worker of a running trial once another trial has completed and both workers have run
    one (a watcher thread). Four trials for two workers: one worker may start a trial or two before the
    other has imported torch."""
    start = time.time()
    while time.time() - start < limit:
        # only once trials run: opening a study that is being created would race its table creation
        trials = _trials(sweep) if any(sweep.glob("trial-*")) else []
        seen["workers"] = {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}
        running = [t for t in trials if t.state.name == "RUNNING" and "worker" in t.user_attrs]
        # both workers seen with a trial: on a loaded machine one may start a few seconds after the other
        if running and any(t.state.name == "COMPLETE" for t in trials) and len(seen["workers"]) == 2:
            pid = running[0].user_attrs["worker"]
            os.kill(pid, signal.SIGKILL)
            # what the kill left, read after it: the trial polled as running may have completed in between
            # and its worker started the next one, which is then the one cut off (CI saw that race)
            time.sleep(0.5)
            after = _trials(sweep)
            cut = [t.number for t in after if t.state.name == "RUNNING" and t.user_attrs.get("worker") == pid]
            if cut:
                seen["killed"] = cut[0]
            seen["done"] = {t.number: (Path(t.user_attrs["run_dir"]) / "summary.json").read_bytes()
                            for t in after if t.state.name == "COMPLETE"}
            return
        time.sleep(0.05)


def test_parallel_workers_then_kill_9_then_resume_repeats_no_finished_trial(tmp_path, capsys):
    base = _project(tmp_path, max_steps=4, eval_every=0)
    spec = _write(tmp_path / "sweep.yaml", {
        "objective": "eval/alpha/loss", "method": "tpe", "trials": 4, "workers": 2, "pruner": "none", "seed": 3,
        "space": {"train.learning_rate": {"log_uniform": [1e-3, 0.3]}, "train.warmup_steps": [0, 1]}})
    sweep, seen = tmp_path / "sweep", {}
    watcher = threading.Thread(target=_kill_a_worker_mid_trial, args=(sweep, seen), daemon=True)
    watcher.start()
    os.environ["OMP_NUM_THREADS"], saved = "1", os.environ.get("OMP_NUM_THREADS")
    try:
        code = main(["sweep", str(base), str(spec), "--out", str(sweep)])
    finally:
        os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.update(OMP_NUM_THREADS=saved)
    watcher.join()
    assert "killed" in seen, "no moment with a completed and a running trial (or the kill fell between two trials)"
    assert len(seen["workers"]) == 2, "two worker processes ran trials side by side"
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("llamaft sweep: error: sweep worker") and "--resume" in err[-1]

    assert main(["sweep", "--resume", str(sweep), "--workers", "1"]) == 0
    assert f"running interrupted trial(s) {seen['killed']} again" in capsys.readouterr().out
    trials = _trials(sweep)
    for number, summary in seen["done"].items():  # finished before the kill: kept as they were, not run again
        assert (Path(trials[number].user_attrs["run_dir"]) / "summary.json").read_bytes() == summary
    killed = trials[seen["killed"]]
    assert killed.state.name == "FAIL" and killed.user_attrs["interrupted"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state.name == "COMPLETE"
    assert sum(t.state.name == "COMPLETE" for t in trials) == 4 and len(trials) == 5
    assert len({t.user_attrs["run_dir"] for t in trials}) == 5
    fresh = [t.params["train.learning_rate"] for t in trials if "retry_of" not in t.user_attrs]
    assert len(set(fresh)) == len(fresh), "workers (and the resumed sweep) drew values of their own"
    assert (sweep / "plots" / "importance.png").read_bytes()[:4] == b"\x89PNG"  # 4 completed, 2 keys
    rows = strict_json((sweep / "results.json").read_text())["trials"]
    assert [r["state"] for r in rows] == ["completed"] * 4 + ["interrupted"]


def test_ctrl_c_marks_the_trial_interrupted_ranks_what_finished_and_resume_runs_it(tmp_path, capsys, monkeypatch):
    from llamaft.sweep import trial as trial_module

    base = _project(tmp_path, max_steps=2, eval_every=0)
    spec = _write(tmp_path / "sweep.yaml", {"objective": "eval/alpha/loss", "method": "grid", "pruner": "none",
                                            "space": {"train.learning_rate": [0.1]}})

    def interrupted(cfg, **kw):  # Ctrl-C as the trial starts (train writes its interrupted summary itself)
        raise KeyboardInterrupt

    monkeypatch.setattr(trial_module, "train", interrupted)
    assert main(["sweep", str(base), str(spec), "--out", str(tmp_path / "sweep")]) == 130
    out = capsys.readouterr().out
    assert f"sweep interrupted; continue it with: llamaft sweep --resume {tmp_path / 'sweep'}" in out
    rows = strict_json((tmp_path / "sweep" / "results.json").read_text())["trials"]
    assert [(r["state"], r["reason"]) for r in rows] == [("interrupted", "interrupted: the sweep stopped during this trial")]
    monkeypatch.undo()
    assert main(["sweep", "--resume", str(tmp_path / "sweep")]) == 0
    rows = strict_json((tmp_path / "sweep" / "results.json").read_text())["trials"]
    assert [(r["trial"], r["state"], r["retry_of"]) for r in rows] == [(1, "completed", 0), (0, "interrupted", None)]
    assert (tmp_path / "sweep" / "best.yaml").is_file()
