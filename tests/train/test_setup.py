"""TrainConfig → TrainingArguments mapping, hardware errors before any data/model load, resume choice."""

from pathlib import Path

import pytest
import torch

from llamaft.errors import LlamaftError
from llamaft.train import recipe
from llamaft.train.checkpoint import clean_incomplete, latest_complete, resolve_resume
from llamaft.train.setup import training_arguments
from train_helpers import run_config

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")


def _args(tmp_path, **train):
    cfg = run_config(Path("unused"), tmp_path / "run", **train)
    return training_arguments(cfg, tmp_path / "run" / "checkpoints", bf16=False, fp16=False, has_eval=True, grad_ckpt=False)


def test_mapping_of_our_names(tmp_path):
    a = _args(tmp_path, scheduler="cosine", warmup_ratio=0.1, micro_batch_size=3, gradient_accumulation=5,
              weight_decay=0.01, max_grad_norm=0.5, seed=7, eval_every=10, save_every=0.5, logging_every=0.1,
              save_total_limit=3, max_steps=40)
    assert (a.lr_scheduler_type.value, a.warmup_steps, a.get_warmup_steps(40)) == ("cosine", 0.1, 4)
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps) == (3, 5)
    assert (a.weight_decay, a.max_grad_norm, a.seed, a.data_seed, a.max_steps) == (0.01, 0.5, 7, 7, 40)
    assert (a.eval_strategy.value, a.eval_steps) == ("steps", 10)
    # fractions stay floats < 1: HF turns them into ceil(ratio * max_steps) when training starts
    assert (a.save_strategy.value, a.save_steps, a.logging_steps) == ("steps", 0.5, 0.1)
    assert a.save_total_limit == 3 and a.remove_unused_columns is False and a.label_names == ["labels"]
    assert a.output_dir.endswith("checkpoints") and a.optim.value == "adamw_torch"
    assert a.report_to == [] or a.report_to == "none" or a.report_to == ["none"]  # tensorboard attached by recipe


def test_warmup_steps_win_and_constant_keeps_warmup(tmp_path):
    a = _args(tmp_path, scheduler="constant", warmup_steps=5, warmup_ratio=0.5)
    # HF's plain "constant" would silently drop warm-up
    assert (a.lr_scheduler_type.value, a.warmup_steps) == ("constant_with_warmup", 5)


def test_zero_means_no_periodic_eval_or_save(tmp_path):
    a = _args(tmp_path, eval_every=0, save_every=0)
    assert (a.eval_strategy.value, a.save_strategy.value) == ("no", "no")


def test_epochs_when_no_max_steps(tmp_path):
    a = _args(tmp_path, max_steps=None, epochs=3)
    assert (a.max_steps, a.num_train_epochs) == (-1, 3.0)


@cpu_only
@pytest.mark.parametrize("override, message", [
    ({"method": "qlora"}, "QLoRA needs a CUDA GPU with bitsandbytes; use model.method=lora on CPU"),
    ({"optimizer": "adamw_8bit"}, "train.optimizer=adamw_8bit needs a CUDA GPU"),
    ({"optimizer": "paged_adamw_8bit"}, "train.optimizer=paged_adamw_8bit needs a CUDA GPU"),
    ({"precision": "fp16"}, "fp16 needs a CUDA GPU"),
])
def test_hardware_errors_come_before_data(tmp_path, override, message):
    cfg = run_config(tmp_path / "no-model", tmp_path / "run", **override)
    # Neither the data files nor the model exist: reading either first would fail with another error.
    assert not any(Path(p).exists() for p in [cfg.model.name, *cfg.data.train, *cfg.data.validation.values()])
    with pytest.raises(LlamaftError, match=message):
        recipe.train(cfg)
    assert not (tmp_path / "run").exists()


def test_resume_picks_latest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in [(2, True), (4, True), (6, False)]:
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (root / ".staging" / "checkpoint-8").mkdir(parents=True)
    assert latest_complete(root).name == "checkpoint-4"
    assert resolve_resume(True, root).name == "checkpoint-4"
    assert resolve_resume(str(root / "checkpoint-2"), root).name == "checkpoint-2"
    with pytest.raises(LlamaftError, match="not a complete checkpoint"):
        resolve_resume(str(root / "checkpoint-6"), root)
    with pytest.raises(LlamaftError, match="checkpoint not found"):
        resolve_resume(str(root / "checkpoint-99"), root)
    assert resolve_resume(False, root) is None
    removed = {p.name for p in clean_incomplete(root)}
    assert removed == {"checkpoint-6", ".staging"}
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_resolve_steps_is_the_one_place_batch_shape_checkpointing_and_optimizer_are_settled(tmp_path, monkeypatch):
    from llamaft.model.fast import FastPlan
    from llamaft.train import setup

    t = run_config(Path("unused"), tmp_path / "run", micro_batch_size=8, gradient_accumulation=4).train
    assert setup.resolve_steps(t) == setup.Steps(8, 4, False, "adamw_torch")  # no plan: the config (CPU: auto = off)
    regrouped = FastPlan(True, "varlen", True, True, False, micro_batch_size=16, gradient_accumulation=2,
                         fused_optimizer=True, own_checkpointing=False)
    assert setup.resolve_steps(t, regrouped) == setup.Steps(16, 2, True, "adamw_torch")  # HF's checkpointing; no CUDA
    monkeypatch.setattr(setup, "cuda_available", lambda: True)
    assert setup.resolve_steps(t, regrouped).optim == "adamw_torch_fused"
    ours = FastPlan(True, "varlen", True, True, False, own_checkpointing=True)
    assert setup.resolve_steps(t, ours) == setup.Steps(8, 4, False, "adamw_torch")  # ours: HF's stays off
    assert setup.resolve_steps(t).gradient_checkpointing  # no plan, auto, a GPU: on
