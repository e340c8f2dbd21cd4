"""Optimizer in backward (train/in_backward.py): the same updates as torch AdamW over the whole model,
no gradient left after the backward, the LR scheduler reaching every inner optimizer, a state dict
that resumes exactly, NaN/Inf safety, and the recipe training, resuming and stopping with it.
Tiny random Llama on CPU (fp32: the comparisons are tight)."""

import copy
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llamaft.errors import TrainingDiverged
from llamaft.train import recipe
from llamaft.train.in_backward import InBackwardOptimizer, check_run, decay_parameter_names, in_backward_of
from train_helpers import InjectNaNLoss, run_config, strict_json, tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")

LR, DECAY = 1e-2, 0.1


def tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(n)]


def hf_adamw(model, lr=LR, weight_decay=DECAY):
    """torch AdamW grouped as HF's create_optimizer groups it (no decay for biases and norms)."""
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
                              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}], lr=lr)


def step(model, batch, opt):
    """One training step as any loop writes it (for an InBackwardOptimizer, step and zero_grad have
    nothing left to do)."""
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# The optimizer on its own


def test_updates_match_torch_adamw_and_no_gradient_outlives_the_backward():
    ref, ours = tiny(), tiny()
    opt, ib = hf_adamw(ref), InBackwardOptimizer(ours, "adamw_torch", lr=LR, weight_decay=DECAY)
    for b in batches(4):
        step(ref, b, opt)
        ib.begin_backward()
        step(ours, b, ib)
        assert all(p.grad is None for p in ours.parameters())  # the memory point: no gradient buffer
        assert ib.updates_applied and torch.isfinite(ib.grad_norm())
    assert_same_weights(ref, ours)
    # biases and norms undecayed, the rest decayed: HF's grouping
    decayed = {n for n, g in zip(ib.names, ib.param_groups) if g["weight_decay"] == DECAY}
    assert decayed == decay_parameter_names(ours) and "model.norm.weight" not in decayed
    ib.remove_hooks()
    ours(input_ids=b, labels=b).loss.backward()
    assert all(p.grad is not None for p in ours.parameters())  # detached: gradients stay again


def test_grad_norm_is_the_norm_of_the_whole_gradient():
    ref, ours = tiny(), tiny()
    ib = InBackwardOptimizer(ours, lr=LR)
    b = batches(1)[0]
    ref(input_ids=b, labels=b).loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    ib.begin_backward()
    step(ours, b, ib)
    torch.testing.assert_close(ib.grad_norm(), expected, rtol=1e-5, atol=0)
    ib.begin_backward()
    assert ib.grad_norm() is None and not ib.updates_applied


def test_lr_scheduler_on_the_wrapper_writes_the_inner_optimizers_lr():
    from transformers import get_linear_schedule_with_warmup

    ref, ours = tiny(), tiny()
    opt, ib = hf_adamw(ref), InBackwardOptimizer(ours, lr=LR, weight_decay=DECAY)
    assert all(g is inner.param_groups[0] for g, inner in zip(ib.param_groups, ib.inner))
    scheds = [get_linear_schedule_with_warmup(o, num_warmup_steps=2, num_training_steps=5) for o in (opt, ib)]
    assert {inner.param_groups[0]["lr"] for inner in ib.inner} == {0.0}  # warm-up starts at 0
    seen = []
    for b in batches(4):
        step(ref, b, opt)
        step(ours, b, ib)
        for s in scheds:
            s.step()
        lrs = {inner.param_groups[0]["lr"] for inner in ib.inner}
        assert lrs == {opt.param_groups[0]["lr"]}
        seen.append(lrs.pop())
    assert seen == pytest.approx([LR / 2, LR, LR * 2 / 3, LR / 3])
    assert_same_weights(ref, ours)  # warm-up and decay reached every inner step


def test_state_dict_resumes_exactly_through_torch_save_and_weights_only_load(tmp_path):
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    data = batches(4)
    straight = tiny()
    ib = InBackwardOptimizer(straight, lr=LR, weight_decay=DECAY)
    for b in data:
        step(straight, b, ib)

    first = tiny()
    ib1 = InBackwardOptimizer(first, lr=LR, weight_decay=DECAY)
    for b in data[:2]:
        step(first, b, ib1)
    torch.save(ib1.state_dict(), tmp_path / "optimizer.pt")  # as HF's _save_optimizer_and_scheduler
    assert (tmp_path / "optimizer.pt").stat().st_size > 0

    resumed = tiny(seed=1)
    resumed.load_state_dict(first.state_dict())
    # as HF resumes: accelerate wraps the optimizer (its device placement round-trips the state dict),
    # the scheduler is built on the wrapper, then optimizer.pt is loaded with weights_only=True
    wrapped = Accelerator(cpu=True).prepare_optimizer(InBackwardOptimizer(resumed, lr=LR, weight_decay=DECAY))
    assert in_backward_of(wrapped) is wrapped.optimizer
    sched = get_linear_schedule_with_warmup(wrapped, num_warmup_steps=0, num_training_steps=100)
    wrapped.load_state_dict(torch.load(tmp_path / "optimizer.pt", map_location="cpu", weights_only=True))
    ib2 = in_backward_of(wrapped)
    assert all(g is inner.param_groups[0] for g, inner in zip(ib2.param_groups, ib2.inner))
    for b in data[2:]:
        step(resumed, b, wrapped)
    assert_same_weights(straight, resumed)
    assert int(ib2.state[next(iter(resumed.parameters()))]["step"]) == 4
    sched.step()  # after a load, the scheduler still reaches the inner optimizers
    assert [inner.param_groups[0]["lr"] for inner in ib2.inner] == pytest.approx([LR * 99 / 100] * len(ib2.inner))

    other = tiny()
    other.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="holds 21 parameters; this model trains 20"):
        InBackwardOptimizer(other, lr=LR).load_state_dict(ib1.state_dict())
    renamed = ib1.state_dict()
    renamed["param_groups"][0]["param_names"] = ["embedding"]
    with pytest.raises(ValueError, match="does not match this model: embedding where model.embed_tokens.weight is"):
        InBackwardOptimizer(tiny(), lr=LR).load_state_dict(renamed)


def test_skip_updates_leaves_weights_and_states_untouched():
    model = tiny()
    ib = InBackwardOptimizer(model, lr=LR, weight_decay=DECAY)
    step(model, batches(1)[0], ib)
    weights = copy.deepcopy(model.state_dict())
    states = lambda: {n: {k: v.clone() for k, v in ib.state[p].items()} for n, p in model.named_parameters()}
    before = states()
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))
    b = batches(1, seed=2)[0]
    loss = model(input_ids=b, labels=b).loss
    assert not torch.isfinite(loss)
    ib.begin_backward(skip_updates=True)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert not ib.updates_applied and torch.isnan(ib.grad_norm())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = states()
    assert all(torch.equal(after[n][k], v) for n, st in before.items() for k, v in st.items())
    assert int(after["lm_head.weight"]["step"]) == 1


def test_refuses_runs_it_cannot_serve_with_one_line():
    ok = dict(gradient_accumulation_steps=1, world_size=1, n_gpu=0, fp16=False, max_grad_norm=0.0)
    check_run(SimpleNamespace(**ok))
    for change, words in [({"gradient_accumulation_steps": 2}, "train.gradient_accumulation=1"),
                          ({"world_size": 2}, "one process"), ({"n_gpu": 2}, "CUDA_VISIBLE_DEVICES=0"),
                          ({"fp16": True}, "train.precision=bf16"), ({"max_grad_norm": 1.0}, "train.max_grad_norm=0")]:
        with pytest.raises(ValueError, match=words) as err:
            check_run(SimpleNamespace(**{**ok, **change}))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="supports adamw_torch"):
        InBackwardOptimizer(tiny(), "adafactor", lr=LR)
    with pytest.raises(ValueError, match="no trainable parameters"):
        InBackwardOptimizer(tiny().requires_grad_(False), lr=LR)


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_8bit_names_build_bitsandbytes_adamw_unpaged_with_32bit_embeddings(optim, monkeypatch):
    """bitsandbytes needs CUDA: a stand-in module records what would be built (8-bit states, never paged;
    the embedding's states in 32 bits, as HF's create_optimizer overrides them)."""
    built = []

    class AdamW(torch.optim.AdamW):
        def __init__(self, params, *, optim_bits, is_paged, **kwargs):
            built.append((optim_bits, is_paged))
            super().__init__(params, **kwargs)

    fake = ModuleType("bitsandbytes")
    fake.optim = SimpleNamespace(AdamW=AdamW)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    model = tiny()
    ib = InBackwardOptimizer(model, optim, lr=LR, weight_decay=DECAY)
    bits = dict(zip(ib.names, built))
    assert bits.pop("model.embed_tokens.weight") == (32, False)
    assert set(bits.values()) == {(8, False)}
    assert all(isinstance(o, AdamW) for o in ib.inner)


def test_fused_name_is_torch_adamw_fused_only_on_cuda():
    ib = InBackwardOptimizer(tiny(), "adamw_torch_fused", lr=LR)
    assert {type(o) for o in ib.inner} == {torch.optim.AdamW}
    assert {g["fused"] for g in ib.param_groups} == {None}  # CPU: the per-tensor reference path


def test_guard_reads_the_norm_from_the_hooks_and_stops_on_an_applied_update():
    from transformers import TrainerControl

    from llamaft.train.nonfinite import NonFiniteGuard

    model = tiny()
    ib = InBackwardOptimizer(model, lr=LR)
    b = batches(1)[0]
    poison = model.lm_head.weight.register_hook(lambda g: g * float("nan"))  # a NaN gradient, finite loss
    ib.begin_backward()
    loss = model(input_ids=b, labels=b).loss
    loss.backward()
    poison.remove()
    guard, control = NonFiniteGuard("skip", max_skips=3), TrainerControl()
    guard.add_loss(loss)
    accelerated = SimpleNamespace(optimizer=ib)  # what the Trainer's callbacks get: accelerate's wrapper
    guard.on_pre_optimizer_step(SimpleNamespace(fp16=False, device="cpu"), SimpleNamespace(global_step=6), control,
                                model=model, optimizer=accelerated)
    assert control.should_training_stop and guard.skipped == []
    assert guard.stopped.step == 7 and guard.stopped.reason.startswith("the gradient norm is nan; its update was already applied")
    assert "skip cannot undo it" in guard.stopped.reason


# ---------------------------------------------------------------------------------------------
# Through the recipe: a full fine-tune with the plan's optimizer_in_backward on


class InBackwardPlan:
    """The plan the recipe picked, with optimizer_in_backward on (CPU plans never turn it on)."""

    optimizer_in_backward = True

    def __init__(self, plan):
        self._plan = plan

    def __getattr__(self, name):
        return getattr(self._plan, name)


@pytest.fixture
def in_backward_plan(monkeypatch):
    real = recipe.pick_plan  # the recipe's one call that settles the plan (every objective)

    def pick(*args, **kwargs):
        model, collator, plan = real(*args, **kwargs)
        return model, collator, InBackwardPlan(plan)

    monkeypatch.setattr(recipe, "pick_plan", pick)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("project"))


def _cfg(model_dir, out, **train):
    """Full fine-tuning, 4 steps of 4 rows, no accumulation, no clipping, weight decay, linear warm-up."""
    return run_config(model_dir, out, **{
        "method": "full", "max_steps": 4, "gradient_accumulation": 1, "max_grad_norm": 0.0, "weight_decay": DECAY,
        "scheduler": "linear", "warmup_steps": 1, "save_every": 2, "eval_every": 0, "save_total_limit": None,
        "report_to": [], **train})


def _weights(run: Path, sub: str = "model") -> dict:
    return load_file(run / sub / "model.safetensors")


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def reference_run(model_dir, tmp_path_factory):
    """The same run with HF's own AdamW (no clipping), for comparison."""
    return recipe.train(_cfg(model_dir, tmp_path_factory.mktemp("ref") / "run"))


def test_recipe_trains_like_hf_adamw_and_resumes_exactly(model_dir, reference_run, tmp_path, in_backward_plan):
    from transformers import TrainingArguments

    run = recipe.train(_cfg(model_dir, tmp_path / "run"))
    summary = strict_json((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["optimizer_in_backward"] is True
    assert "optimizer_in_backward" not in strict_json((reference_run / "summary.json").read_text())
    ours, ref = _weights(run), _weights(reference_run)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # losses, learning rates and gradient norms as HF's AdamW logged them (the norm from the hooks)
    for a, b in zip(_train_rows(run), _train_rows(reference_run), strict=True):
        assert a["train/learning_rate"] == b["train/learning_rate"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4) and a["train/grad_norm"] > 0
    args = torch.load(run / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert isinstance(args, TrainingArguments) and args.max_grad_norm == 0.0

    # Resume from checkpoint-2: optimizer.pt (HF's torch.save, loaded back with weights_only=True),
    # scheduler and data position restored, the last two steps land on the same weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for name in ("model", "checkpoints/checkpoint-4"):
        shutil.rmtree(resumed / name)
    (resumed / "summary.json").unlink()
    recipe.train(_cfg(model_dir, resumed, resume=True))
    again = _weights(resumed)
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    assert strict_json((resumed / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")


def test_recipe_skips_a_nan_loss_before_its_update(model_dir, tmp_path, in_backward_plan):
    out = tmp_path / "run"
    recipe.train(_cfg(model_dir, out, on_nonfinite="skip", save_every=1), callbacks=[InjectNaNLoss({2})])
    summary = strict_json((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["nonfinite_skipped_steps"] == [2]
    one, two = _weights(out, "checkpoints/checkpoint-1"), _weights(out, "checkpoints/checkpoint-2")
    assert all(torch.equal(one[k], two[k]) for k in one)  # the NaN loss never reached the weights
    assert all(torch.isfinite(t).all() for t in _weights(out).values())


class PoisonGradient(InjectNaNLoss):
    """A NaN in one gradient during step `step` while the loss stays finite (a hook before accumulation)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.lm_head.weight.register_hook(lambda g: g * float("nan") if self.active else g)


def test_recipe_stops_on_a_nan_gradient_whose_update_was_applied(model_dir, tmp_path, in_backward_plan):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training stopped at step 3: the gradient norm is nan; its update was "
                                               r"already applied .* \(train.on_nonfinite=skip cannot undo it\)"):
        recipe.train(_cfg(model_dir, out, on_nonfinite="skip", save_every=1), callbacks=[PoisonGradient({3})])
    summary = strict_json((out / "summary.json").read_text())
    assert summary["status"] == "stopped_nonfinite" and summary["nonfinite_skipped_steps"] == []
    assert summary["stopped"]["last_good_checkpoint"].endswith("checkpoint-2")
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "model").exists()


def test_training_arguments_turn_clipping_off_for_the_plan(tmp_path):
    from llamaft.train.setup import training_arguments

    cfg = run_config(Path("unused"), tmp_path / "run", max_grad_norm=1.0)
    args = lambda plan: training_arguments(cfg, tmp_path / "ckpt", bf16=False, fp16=False, has_eval=False, plan=plan)
    plan = SimpleNamespace(checkpointing="none", reasons=())
    assert args(plan).max_grad_norm == 1.0
    assert args(InBackwardPlan(plan)).max_grad_norm == 0.0
