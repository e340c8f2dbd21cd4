"""Resume: a finished run stays untouched, the end of a schedule trains no extra step, and runs
killed with SIGKILL at seeded random moments (mid-step, mid-checkpoint, mid-final-save) resume to an
adapter bit-identical to an uninterrupted run's. Tiny random Llama on CPU."""

import hashlib
import random
import shutil
import signal

import pytest

from llamaft.cli import main
from llamaft.config import save_config
from llamaft.train.callbacks import read_metrics
from train_helpers import cli_project, run_child, run_config, strict_json, tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")

# max_steps 5 and epochs 1.5 (4 optimizer steps per epoch) both end inside an epoch: exactly where
# HF's loop, resumed at the last step, trained one step more (it checks max_steps only after a step).
SCHEDULES = {"max_steps": {"max_steps": 5}, "epochs": {"max_steps": None, "epochs": 1.5}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module", params=list(SCHEDULES))
def finished(request, model_dir, tmp_path_factory):
    """(config file, run dir) of a completed run; constant lr, so one more step would move the weights."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = run_config(model_dir, root / "run", eval_every=0, save_every=2, scheduler="constant", **SCHEDULES[request.param])
    save_config(cfg, root / "run.yaml")
    assert main(["train", str(root / "run.yaml")]) == 0
    return root / "run.yaml", root / "run"


def _files(run):
    """Every file under the run dir: path -> (sha256, mtime): 'changes nothing' means not even rewritten."""
    return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


def _steps(run) -> int:
    return strict_json((run / "summary.json").read_text())["steps"]


def test_resuming_a_finished_run_changes_nothing(finished, capsys):
    cfg, run = finished
    before = _files(run)
    assert main(["train", str(cfg), "train.resume=true"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("nothing to do")] == [
        f"nothing to do: {run} already finished its schedule at checkpoint-{_steps(run)}; "
        "raise train.max_steps or train.epochs to train further"]
    assert _files(run) == before


def test_end_of_schedule_without_final_outputs_trains_no_extra_step(finished, tmp_path):
    """Killed after the last checkpoint, before adapter/ and summary.json: resume writes them from the
    last checkpoint. HF alone would train one more step here."""
    cfg, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "adapter")
    (copy / "summary.json").unlink()
    assert main(["train", str(cfg), f"train.output_dir={copy}", "train.resume=true"]) == 0
    assert _steps(copy) == _steps(run)
    assert (copy / "adapter" / "adapter_model.safetensors").read_bytes() == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert max(r["step"] for r in read_metrics(copy / "metrics.jsonl")) == _steps(run)
    assert strict_json((copy / "summary.json").read_text())["status"] == "completed"


def test_raising_max_steps_continues_a_finished_run(finished, tmp_path):
    cfg, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    more = _steps(run) + 2
    assert main(["train", str(cfg), f"train.output_dir={copy}", "train.resume=true", f"train.max_steps={more}"]) == 0
    assert _steps(copy) == more


# ---------------------------------------------------------------------------------------------
# SIGKILL at seeded random moments, then resume


def _kill_plan(rng: random.Random, max_steps: int) -> list[str]:
    """Kills at non-decreasing steps: mid-step, mid-checkpoint (weights written, optimizer not) and
    checkpoint complete but not yet renamed into place, in a seeded random order and at seeded random
    steps, then one during the final save. A kill at step s leaves checkpoint-(s-1) at most, so the
    next run reaches step s again."""
    plan, step = [], 1
    for phase in rng.sample(["train", "save_model", "publish"], 3):
        step = rng.randint(step, min(step + 1, max_steps))
        plan.append(f"{phase}:{step}")
    return plan + ["final:0"]


def _has_checkpoint(run) -> bool:
    return any((p / "trainer_state.json").is_file() for p in (run / "checkpoints").glob("checkpoint-*"))


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    reference = cli_project(tmp_path / "ref")
    assert main(["train", str(reference)]) == 0  # uninterrupted (in-process: same code, one thread)

    killed = cli_project(tmp_path / "killed")
    run = tmp_path / "killed" / "run"
    plan = _kill_plan(random.Random(1), max_steps=6)  # train:1 publish:2 save_model:3 final
    for kill in plan:
        resume = ["train.resume=true"] if _has_checkpoint(run) else []
        proc = run_child("train", str(killed), *resume, kill=kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.stdout[-2000:], proc.stderr[-2000:])
        phase, step = kill.split(":")
        if phase in ("save_model", "publish"):  # killed inside the save: only the staging copy exists
            assert not (run / "checkpoints" / f"checkpoint-{step}").exists()
            staged = run / "checkpoints" / ".staging" / f"checkpoint-{step}"
            assert (staged / "adapter_model.safetensors").is_file()
            assert (staged / "trainer_state.json").is_file() == (phase == "publish")
    assert not (run / "summary.json").exists()  # the final kill came before it
    assert main(["train", str(killed), "train.resume=true"]) == 0

    ref_run = tmp_path / "ref" / "run"
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (ref_run / "adapter" / "adapter_model.safetensors").read_bytes(), plan
    losses = lambda r: [(m["step"], m["train/loss"]) for m in read_metrics(r / "metrics.jsonl") if "train/loss" in m]
    assert losses(run) == losses(ref_run)
    assert strict_json((run / "summary.json").read_text())["status"] == "completed"
    assert not list((run / "checkpoints").glob(".*"))
