"""NaN/Inf during training (train.on_nonfinite): stop before the update (exit code 3) or skip it;
checkpoints, summary.json, metrics.jsonl and loss.png tell the truth. Tiny random Llama on CPU."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from llamaft.errors import TrainingDiverged
from llamaft.eval.plots import nonfinite_steps, plot_losses
from llamaft.train import train
from llamaft.train.callbacks import read_metrics, rename_logs
from train_helpers import (InjectInfGrad, InjectNaNLoss, PoisonWeight, Snapshot, cli_project,
                                run_child, run_config, strict_json, tiny_project)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("project"))


def _cfg(model_dir, out, **train):
    # save every step, keep every checkpoint: each test can look at the one before the bad step
    return run_config(model_dir, out, eval_every=0, save_every=1, save_total_limit=None, **train)


def _adapter(path):
    return load_file(path / "adapter_model.safetensors")


def _checkpoints(run):
    return sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors.values())


# ---------------------------------------------------------------------------------------------
# The CLI on a real divergence (learning rate 1e4)


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    root = tmp_path_factory.mktemp("diverged")
    proc = run_child("train", str(cli_project(root)), "train.learning_rate=1e4")
    return root / "run", proc


def test_divergence_exits_3_with_one_line_and_no_traceback(diverged):
    run, proc = diverged
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llamaft")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    msg = errors[0]
    assert msg.startswith("llamaft train: error: training stopped at step ")
    assert re.match(r"llamaft train: error: training stopped at step \d+: the (loss|gradient norm) is (nan|inf);", msg), msg
    for hint in ("last finite loss", "last good checkpoint", "train.learning_rate", "train.warmup_steps",
                 "train.max_grad_norm", "train.precision"):
        assert hint in msg, hint
    assert "run saved" not in proc.stdout


def test_divergence_keeps_only_finite_checkpoints_and_no_final_adapter(diverged):
    from llamaft.model.inference import load_for_inference
    from llamaft.train.checkpoint import resolve_resume

    run, _ = diverged
    summary = strict_json((run / "summary.json").read_text())
    assert summary["status"] == "stopped_nonfinite"
    stopped = summary["stopped"]
    ckpts = _checkpoints(run)
    assert ckpts, "the steps before the divergence were checkpointed"
    assert all(int(c.name.split("-")[1]) < stopped["step"] for c in ckpts)
    assert all(_all_finite(_adapter(c)) for c in ckpts)
    assert stopped["last_good_checkpoint"] == str(ckpts[-1])
    assert isinstance(stopped["last_finite_loss"], float) and stopped["last_finite_step"] <= stopped["step"]
    # the last good checkpoint is what resume picks, and it loads
    assert resolve_resume(True, run / "checkpoints") == ckpts[-1]
    model, _, _ = load_for_inference(ckpts[-1], device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # a diverged run has no final adapter: nothing that looks like a result
    assert not (run / "adapter").exists()
    assert not list((run / "checkpoints").glob(".*"))  # no staging / half-written leftovers


def test_divergence_summary_metrics_and_plot_are_honest(diverged):
    run, _ = diverged
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [strict_json(line) for line in lines]  # no bare NaN anywhere
    step = strict_json((run / "summary.json").read_text())["stopped"]["step"]
    last = [r for r in rows if r["step"] == step and "train/grad_norm" in r]
    assert last and last[0]["nonfinite"], "the stopping step's log row marks what was not finite"
    assert all(v in ("nan", "inf", "-inf") for v in last[0]["nonfinite"].values())
    assert all(r.get("train/loss") != 0 for r in rows if "train/loss" in r)  # never a made-up 0
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_of_a_diverged_run_refuses_and_its_checkpoint_merges(diverged, tmp_path, capsys):
    from llamaft.cli import main

    run, _ = diverged
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training stopped at step" in err[0] and "checkpoint" in err[0]
    assert not (tmp_path / "merged").exists()
    # explicit: the last good checkpoint is mergeable by path, and the result is finite
    good = _checkpoints(run)[-1]
    assert main(["merge", str(good), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert _all_finite(merged)


# ---------------------------------------------------------------------------------------------
# stop (default): injected NaN loss, Inf gradient, NaN weight


def test_nan_loss_stops_before_its_update(model_dir, tmp_path):
    out, snap = tmp_path / "run", Snapshot()
    with pytest.raises(TrainingDiverged, match=r"training stopped at step 4: the loss is nan; last finite loss [\d.]+ at step 3"):
        train(_cfg(model_dir, out), callbacks=[InjectNaNLoss({4}), snap])
    assert TrainingDiverged.exit_code == 3
    ckpts = _checkpoints(out)
    assert [c.name for c in ckpts] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # the refused update changed nothing: the weights training ended with are checkpoint-3's
    saved = _adapter(ckpts[-1])
    live = {k.replace(".default", ""): v for k, v in snap.weights.items()}
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    summary = strict_json((out / "summary.json").read_text())
    assert summary["status"] == "stopped_nonfinite" and summary["steps"] == 4
    assert summary["stopped"]["reason"] == "the loss is nan" and summary["stopped"]["last_finite_step"] == 3
    assert summary["train_loss"] is None  # the last logged loss was NaN: null, not a number
    rows = read_metrics(out / "metrics.jsonl")
    assert nonfinite_steps(rows) == [4]
    assert [r["train/loss"] for r in rows if r["step"] == 4 and "train/loss" in r] == [None]
    assert not (out / "adapter").exists()


def test_inf_gradient_with_finite_loss_stops(model_dir, tmp_path):
    with pytest.raises(TrainingDiverged, match="training stopped at step 2: the gradient norm is inf"):
        train(_cfg(model_dir, tmp_path / "run"), callbacks=[InjectInfGrad(2)])
    assert [c.name for c in _checkpoints(tmp_path / "run")] == ["checkpoint-1"]


def test_checkpoint_with_nonfinite_weights_is_never_published(model_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training stopped at step 3: weight \S+lora_A\S+ is not finite"):
        train(_cfg(model_dir, out), callbacks=[PoisonWeight(3)])
    assert [c.name for c in _checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "checkpoints" / ".staging").exists()
    assert all(_all_finite(_adapter(c)) for c in _checkpoints(out))
    assert strict_json((out / "summary.json").read_text())["status"] == "stopped_nonfinite"


# ---------------------------------------------------------------------------------------------
# skip


def test_skip_policy_skips_a_few_steps_and_completes(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(model_dir, out, on_nonfinite="skip", max_nonfinite_skips=2), callbacks=[InjectNaNLoss({2, 5})])
    assert "step 2: the loss is nan; update skipped (1 of train.max_nonfinite_skips=2)" in capsys.readouterr().out
    summary = strict_json((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["nonfinite_skipped_steps"] == [2, 5]
    ck = {c.name: _adapter(c) for c in _checkpoints(out)}
    # a skipped step does not move the weights; the steps around it do
    assert all(torch.equal(ck["checkpoint-1"][k], ck["checkpoint-2"][k]) for k in ck["checkpoint-1"])
    assert not all(torch.equal(ck["checkpoint-2"][k], ck["checkpoint-3"][k]) for k in ck["checkpoint-2"])
    assert _all_finite(_adapter(out / "adapter"))
    rows = read_metrics(out / "metrics.jsonl")
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert losses[2] is None and losses[5] is None
    # HF resets its running loss with `x -= x`: without our reset every later step would log NaN too
    assert all(isinstance(losses[s], float) for s in (1, 3, 4, 6, 7, 8))
    assert nonfinite_steps(rows) == [2, 5]


def test_skip_policy_stops_after_max_skips(model_dir, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"step 4: the loss is nan \(after 2 skipped steps.*max_nonfinite_skips"):
        train(_cfg(model_dir, tmp_path / "run", on_nonfinite="skip", max_nonfinite_skips=2),
              callbacks=[InjectNaNLoss({2, 3, 4})])
    summary = strict_json((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped_nonfinite" and summary["nonfinite_skipped_steps"] == [2, 3]


# ---------------------------------------------------------------------------------------------
# Pieces


def test_rename_logs_marks_nonfinite_values():
    row = rename_logs({"loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 1e-3}, [])
    assert row == {"train/loss": None, "train/grad_norm": None, "train/learning_rate": 1e-3,
                   "nonfinite": {"train/loss": "nan", "train/grad_norm": "inf"}}
    assert strict_json(json.dumps(row, allow_nan=False)) == row


def test_plot_draws_a_run_whose_every_loss_was_nan(tmp_path):
    rows = [{"step": 1, "train/loss": None, "nonfinite": {"train/loss": "nan"}}]
    assert plot_losses(rows, [], tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_fresh_run_may_reuse_the_dir_of_a_run_stopped_before_any_checkpoint(model_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="no checkpoint was saved before it"):
        train(_cfg(model_dir, out), callbacks=[InjectNaNLoss({1})])
    train(_cfg(model_dir, out, max_steps=2))  # not "already holds a run": nothing there to resume
    assert strict_json((out / "summary.json").read_text())["status"] == "completed"


def _guard_step(guard, *, fp16, loss, grad):
    from types import SimpleNamespace

    from transformers import TrainerControl

    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.full_like(model.weight, grad)
    guard.add_loss(torch.tensor(loss))
    control = TrainerControl()
    guard.on_pre_optimizer_step(SimpleNamespace(fp16=fp16, device="cpu"), SimpleNamespace(global_step=6), control,
                                model=model)
    return model.weight.grad, control


def test_guard_under_fp16_leaves_inf_gradients_to_the_grad_scaler():
    from llamaft.train.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard()
    grad, control = _guard_step(guard, fp16=True, loss=2.0, grad=float("inf"))  # scaler overflow: normal
    assert guard.stopped is None and not control.should_training_stop and torch.isinf(grad).all()
    # a NaN loss stops; its NaN gradients stay for the scaler, which skips the update (emptying them
    # would make GradScaler.step fail: "No inf checks were recorded")
    grad, control = _guard_step(guard, fp16=True, loss=float("nan"), grad=float("nan"))
    assert guard.stopped.step == 7 and control.should_training_stop and grad is not None
    assert guard.stopped.last_finite_loss == 2.0 and guard.stopped.last_finite_step == 7


def test_guard_drops_the_gradients_it_refuses():
    from llamaft.train.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard("skip", max_skips=1)
    grad, control = _guard_step(guard, fp16=False, loss=1.0, grad=float("nan"))
    assert grad is None and guard.skipped == [7] and not control.should_training_stop
    grad, control = _guard_step(guard, fp16=False, loss=1.0, grad=1.0)
    assert grad is not None and guard.skipped == [7]
    with pytest.raises(ValueError, match="stop or skip"):
        NonFiniteGuard("ignore")


def test_guard_checks_the_norm_the_trainer_measured_and_measures_only_without_one():
    from llamaft.train.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard()
    guard.measured_grad_norm = torch.tensor(float("inf"))  # the Trainer's clip saw an Inf ...
    grad, control = _guard_step(guard, fp16=False, loss=1.0, grad=1.0)  # ... the gradients themselves look fine
    assert guard.stopped is not None and "gradient norm is inf" in guard.stopped.reason and grad is None
    guard = NonFiniteGuard()
    guard.measured_grad_norm = 3.0  # consumed by one step: the next step measures for itself
    _guard_step(guard, fp16=False, loss=1.0, grad=1.0)
    assert guard.measured_grad_norm is None and guard.stopped is None
    _, control = _guard_step(guard, fp16=False, loss=1.0, grad=float("nan"))
    assert guard.stopped is not None and control.should_training_stop


def test_trainer_counts_the_parameters_for_its_flops_once():
    from types import SimpleNamespace

    from llamaft.train.checkpoint import AtomicCheckpointTrainer

    calls = []
    model = SimpleNamespace(main_input_name="input_ids",
                            num_parameters=lambda exclude_embeddings: calls.append(exclude_embeddings) or 1000)
    fake = SimpleNamespace(model=model, _params_for_flops=None)
    ops = [AtomicCheckpointTrainer.floating_point_ops(fake, {"input_ids": torch.zeros(2, n)}) for n in (3, 5)]
    assert ops == [6 * 6 * 1000, 6 * 10 * 1000] and calls == [True]  # HF's formula, one count
    assert AtomicCheckpointTrainer.floating_point_ops(fake, {"labels": torch.zeros(1)}) == 0
