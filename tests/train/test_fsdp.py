"""FSDP2 (distributed.strategy=fsdp) through the HF Trainer / accelerate: the arguments it gets, the fast
path it keeps, the strategy `auto` picks, and a 2-process gloo run against the 1-process one.

The 2-process run is real FSDP2 on CPU: accelerate 1.15 attaches its FSDP plugin only to GPU launches,
so checkpoint.cpu_fsdp attaches it on CPU as it would on a GPU (the test checks the run was sharded).
"""

from pathlib import Path
from types import SimpleNamespace

import pytest

from distributed_helpers import _adapter, _llamaft, _losses, _project
from llamaft.cli import main
from llamaft.config import config_from_dict
from llamaft.errors import ConfigError
from llamaft.model.fast.plan import Facts, choose_plan
from llamaft.train import fsdp
from llamaft.train.setup import training_arguments
from train_helpers import strict_json


def _cfg(**distributed):
    return config_from_dict({"model": {"name": "m"}, "data": {"train": ["t.jsonl"]},
                             "distributed": {"strategy": "fsdp", **distributed}})


def test_fsdp_runs_as_accelerate_fsdp2_with_whole_tensors_in_checkpoints(tmp_path):
    cfg = _cfg(fsdp={"cpu_offload": True, "activation_checkpointing": True})
    args = fsdp.trainer_arguments(cfg, "fsdp")
    assert args["fsdp"] is True and args["gradient_checkpointing"] is False  # FSDP checkpoints the layers itself
    assert args["fsdp_config"] == {"version": 2, "reshard_after_forward": True, "cpu_offload": True,
                                   "activation_checkpointing": True, "state_dict_type": "FULL_STATE_DICT",
                                   "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    assert fsdp.trainer_arguments(cfg, "ddp") == {} and fsdp.trainer_arguments(cfg, "single") == {}
    # what HF hands accelerate's FullyShardedDataParallelPlugin (TrainingArguments._process_fsdp_args)
    hf = training_arguments(cfg, tmp_path, bf16=False, fp16=False, has_eval=False, strategy="fsdp",
                            extra={"use_cpu": True})
    assert hf.fsdp_plugin_args == {"fsdp_version": 2, "cpu_offload": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                   "cpu_ram_efficient_loading": False, "state_dict_type": "FULL_STATE_DICT",
                                   "activation_checkpointing": True, "reshard_after_forward": True}
    # train.gradient_checkpointing=on asks FSDP for it too
    on = _cfg()
    on.train.gradient_checkpointing = "on"
    assert fsdp.trainer_arguments(on, "fsdp")["fsdp_config"]["activation_checkpointing"] is True


def test_bitsandbytes_8bit_optimizers_are_refused_under_fsdp():
    cfg = _cfg()
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        cfg.train.optimizer = name
        with pytest.raises(ConfigError, match=f"train.optimizer: {name} \\(bitsandbytes\\) cannot step FSDP2"):
            fsdp.optimizer_check(cfg, "fsdp")
        fsdp.optimizer_check(cfg, "ddp")  # DDP steps whole tensors: allowed
    for name in ("adamw_torch", "adamw_torch_8bit"):  # torchao's 8-bit AdamW steps DTensor shards
        cfg.train.optimizer = name
        fsdp.optimizer_check(cfg, "fsdp")


def test_torchaos_8bit_adamw_is_hfs_name_and_needs_torchao(monkeypatch):
    import importlib.util

    from llamaft.errors import LlamaftError
    from llamaft.model.fast.memory import optimizer_bytes_per_param
    from llamaft.train.setup import check_optimizer

    cfg = _cfg()
    cfg.train.optimizer = "adamw_torch_8bit"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torchao" else real(name, *a))
    assert check_optimizer(cfg.train) == "adamw_torch_8bit" and optimizer_bytes_per_param("adamw_torch_8bit") == 2
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(LlamaftError, match=r"adamw_torch_8bit needs torchao: run `pip install torchao`"):
        check_optimizer(cfg.train)


def test_hybrid_sharding_replicates_across_machines(monkeypatch):
    cfg = _cfg(fsdp={"sharding": "hybrid"})
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # one machine: full sharding, said so
    assert "parallelism_config" not in fsdp.trainer_arguments(cfg, "fsdp")
    assert "sharding hybrid = full on one machine" in fsdp.plan_line(cfg, "fsdp")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # two machines of 4
    pc = fsdp.trainer_arguments(cfg, "fsdp")["parallelism_config"]
    assert (pc.dp_replicate_size, pc.dp_shard_size) == (2, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="each of the 8 machines runs one process; use sharding: full"):
        fsdp.trainer_arguments(cfg, "fsdp")


def test_auto_is_ddp_on_cpu_and_explicit_strategies_win(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fsdp.resolve_strategy(_cfg(), None) == ("single", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fsdp.resolve_strategy(_cfg(), None) == ("fsdp", "strategy: fsdp (distributed.strategy=fsdp)")
    auto = _cfg()
    auto.distributed.strategy = "auto"
    assert fsdp.resolve_strategy(auto, None)[0] == "ddp"  # no GPU (the suite's CPU)


def test_auto_shards_what_one_gpu_cannot_hold(monkeypatch):
    """auto on GPUs: the memory estimate of one replica with every layer checkpointed against one card."""
    import llamaft.model.fast.memory as memory

    auto = _cfg()
    auto.distributed.strategy = "auto"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(memory, "fits", lambda *a: (False, "estimated peak 151.0 GiB > 130.0 GiB usable"))
    assert fsdp._auto(auto, None) == ("fsdp", "strategy: fsdp (auto: one replica with every layer checkpointed, "
                                      "estimated peak 151.0 GiB > 130.0 GiB usable of one GPU: sharded)")
    monkeypatch.setattr(memory, "fits", lambda *a: (True, "estimated peak 20.0 GiB fits in 130.0 GiB"))
    assert fsdp._auto(auto, None)[0] == "ddp"


def test_the_fast_path_under_fsdp_keeps_packing_and_attention_only():
    cfg = _cfg()
    plan = choose_plan(cfg, None, None, Facts(cuda=True, packed_kernel="varlen", distributed=True, fsdp=True))
    assert plan.packing and plan.attention == "varlen"
    assert not any((plan.fused_loss, plan.compile, plan.fused_lora, plan.own_checkpointing, plan.cpu_embeddings,
                    plan.cpu_lm_head, plan.nf4_kernel, plan.fused_optimizer, plan.gradient_checkpointing))
    assert plan.budget is None and plan.micro_batch_size is None  # no budget, no regrouping: the estimate knows no shards
    assert plan.reasons[-1].startswith("fast path under FSDP2: packing and the attention kernel kept; off: the fused loss")


def test_a_checkpoint_resumes_only_under_the_strategy_that_wrote_it(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    ddp = tmp_path / "checkpoint-3"
    fsdp.resume_check(ddp, "single")  # a DDP / one-process checkpoint: whole tensors, resumed by DDP or one process
    fsdp.resume_check(ddp, "ddp")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / fsdp.FSDP_MODEL_FILE).write_bytes(b"")
    sharded = tmp_path / "checkpoint-4"
    fsdp.resume_check(sharded, "fsdp")
    with pytest.raises(ConfigError, match=r"checkpoint-4 was written by FSDP \(distributed.strategy=fsdp\) and this "
                                          r"run is one process; resume it with distributed.strategy=fsdp"):
        fsdp.resume_check(sharded, "single")
    with pytest.raises(ConfigError, match=r"checkpoint-3 was written without FSDP and this run is fsdp"):
        fsdp.resume_check(ddp, "fsdp")


# ---------------------------------------------------------------------------------------------
# Two processes under FSDP2 against one (gloo, fp32)


@pytest.fixture(scope="module")
def fsdp_processes(tmp_path_factory):
    """The project trained in 2 FSDP2 processes (~30 s), what it wrote read back at once."""
    root = tmp_path_factory.mktemp("fsdp")
    cfg = _project(root)
    first = _llamaft("train", str(cfg), "--nproc", "2", "distributed.strategy=fsdp", marker=str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    run = root / "run"
    return SimpleNamespace(run=run, cfg=cfg, adapter=_adapter(run),
                           checkpoint=_checkpoint_tensors(run / "checkpoints" / "checkpoint-6"),
                           losses=_losses(run, "train/loss"), eval=_losses(run, "eval/val/loss"),
                           summary=strict_json((run / "summary.json").read_text()), stdout=first.stdout)


@pytest.fixture(scope="module")
def fsdp_resumed(fsdp_processes):
    """That run with checkpoint-6 removed, resumed from checkpoint-5 in 2 FSDP2 processes (one step; ~30 s)."""
    import shutil

    r = fsdp_processes
    shutil.rmtree(r.run / "checkpoints" / "checkpoint-6")
    return _llamaft("train", str(r.cfg), "--nproc", "2", "distributed.strategy=fsdp", "train.resume=true",
                    marker=str(r.cfg))


def _checkpoint_tensors(ckpt: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    return {"adapter": load_file(ckpt / "adapter_model.safetensors"),
            "fsdp": torch.load(ckpt / fsdp.FSDP_MODEL_FILE, map_location="cpu", weights_only=True),
            "optimizer": torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=True)}


@pytest.mark.multiprocess
def test_fsdp_trains_what_one_process_trains_and_saves_every_tensor_whole(one_process, fsdp_processes):
    """Per-step loss within 1e-5 of one process (fp32: FSDP reduce-scatters the two processes' gradients,
    one process sums them in one backward: the order of additions differs, ~1e-7 relative, measured 5e-7);
    the final adapter and checkpoint-6 hold every adapter tensor of the 1-process run at its full shape."""
    import torch

    r = fsdp_processes
    one = _losses(one_process, "train/loss")
    assert sorted(r.losses) == list(range(1, 7))
    assert all(abs(one[s] - r.losses[s]) < 1e-5 for s in one), (one, r.losses)
    one_eval = _losses(one_process, "eval/val/loss")
    assert sorted(r.eval) == [3, 6] and all(abs(one_eval[s] - r.eval[s]) < 1e-5 for s in (3, 6))
    reference = _adapter(one_process)
    for name, saved in (("adapter/", r.adapter), ("checkpoint-6", r.checkpoint["adapter"])):
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}, name
        for key in reference:
            torch.testing.assert_close(saved[key], reference[key], rtol=0, atol=1e-5)
    # accelerate's model file for resuming: every trainable tensor, whole (none of the frozen base)
    whole = r.checkpoint["fsdp"]
    assert len(whole) == len(reference) and all(v.dim() == 2 and v.shape[0] * v.shape[1] > 0 for v in whole.values())
    assert {tuple(v.shape) for v in whole.values()} == {tuple(v.shape) for v in reference.values()}
    moments = [s["exp_avg"] for s in r.checkpoint["optimizer"]["state"].values()]
    assert len(moments) == len(reference) and all(isinstance(m, torch.Tensor) and not hasattr(m, "placements")
                                                  for m in moments)
    assert r.summary["batch"]["strategy"] == "fsdp" and r.summary["batch"]["global_batch"] == 8
    assert "fsdp2: weights, gradients and optimizer states sharded over 2 processes (sharding full)" in r.stdout


@pytest.mark.multiprocess
def test_an_fsdp_checkpoint_resumes_under_fsdp_and_not_in_one_process(one_process, fsdp_processes, fsdp_resumed,
                                                                      capsys):
    r = fsdp_processes
    assert fsdp_resumed.returncode == 0, fsdp_resumed.stderr[-3000:]
    assert abs(_losses(r.run, "train/loss")[6] - _losses(one_process, "train/loss")[6]) < 1e-5
    assert strict_json((r.run / "summary.json").read_text())["resumed_from"].endswith("checkpoint-5")
    capsys.readouterr()
    summary = (r.run / "summary.json").read_text()
    assert main(["train", str(r.cfg), "train.resume=true", "train.max_steps=7"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "checkpoint-6 was written by FSDP (distributed.strategy=fsdp) and this run is one process" in err[0]
    assert (r.run / "summary.json").read_text() == summary  # nothing written
