"""Optimizer in backward (train/in_backward.py): the same updates as torch AdamW over the whole model,
no gradient left after the backward, the LR scheduler reaching every inner optimizer, a state dict
that resumes exactly, and NaN/Inf safety.
Tiny random Llama on CPU (fp32: the comparisons are tight)."""

import copy
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from llamaft.train.in_backward import InBackwardOptimizer, check_run, decay_parameter_names, in_backward_of

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
