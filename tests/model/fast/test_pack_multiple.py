"""fast.pack_multiple: packed rows of several examples padded to a multiple of N tokens (data.pack),
decided by the plan. The pad segment changes the GEMM shapes only: loss and gradients stay those of
the unpadded row (tiny Llama, fp32, per-example reference attention)."""

import copy

import pytest
import torch

from fast_helpers import cfg
from llamaft.model.fast import FastPlan, apply_fast_path, make_collator
from llamaft.model.fast import plan as P

PAD = 299  # never drawn below: examples are ids 0..298


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def _loss_and_grads(model, plan, rows):
    model = apply_fast_path(copy.deepcopy(model).train(), plan)
    batch = make_collator(plan, PAD)(rows)
    loss = model(**batch).loss
    loss.backward()
    return batch, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("fused", [False, True])
def test_padded_rows_give_the_unpadded_loss_and_gradients(fused):
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, PAD, (n,), generator=g).tolist()} for n in (5, 9, 3)]
    rows[1]["labels"] = [-100] * 4 + rows[1]["input_ids"][4:]  # a masked prompt
    m = tiny()
    off = FastPlan(True, "reference", fused, False, False, ())
    b0, loss0, grads0 = _loss_and_grads(m, off, rows)
    b1, loss1, grads1 = _loss_and_grads(m, FastPlan(True, "reference", fused, False, False, (), pack_multiple=16), rows)
    assert b0["input_ids"].shape == (1, 17) and b1["input_ids"].shape == (1, 32)  # 15 pad tokens
    assert b1["cu_seq_lens_q"].tolist() == [0, 5, 14, 17, 32]
    assert abs(float(loss1 - loss0)) <= 1e-6
    for name, grad in grads0.items():
        assert torch.allclose(grads1[name], grad, rtol=0, atol=1e-6), name


def test_pack_multiple_decider():
    assert P.pack_multiple(cfg(), True) == (0, None)  # opt-in: auto pads nothing (no gain measured)
    assert P.pack_multiple(cfg(fast__pack_multiple=256), True) == (256, (
        "packed rows padded to a multiple of 256 tokens (fast.pack_multiple=256): few distinct GEMM shapes; "
        "<= 255 pad tokens per micro-batch"))
    assert P.pack_multiple(cfg(fast__pack_multiple=256), False) == (0, None)  # no packing, nothing to pad
    assert P.pack_multiple(cfg(fast__pack_multiple="off"), True) == (
        0, "packed rows not padded (fast.pack_multiple=0): one GEMM shape per row length")


def test_plan_carries_the_multiple_to_the_collator_and_the_memory_estimate(monkeypatch):
    import llamaft.model.fast.memory as mem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = P.choose_plan(cfg(data__packing="on", fast__pack_multiple=64), None)
    assert plan.pack_multiple == 64 and any("multiple of 64 tokens" in r for r in plan.reasons)
    assert make_collator(plan, PAD).multiple == 64 and make_collator(plan, PAD).pad_id == PAD
    assert P.choose_plan(cfg(data__packing="on"), None).pack_multiple == 0
    tokens_of = mem.micro_batch_tokens(cfg(data__max_seq_length=100), [50, 300, 20], multiple=64)
    assert (tokens_of(1), tokens_of(2), tokens_of(3)) == (100, 192, 192)  # one example is never padded


def test_config_refuses_bad_multiples():
    from llamaft.errors import ConfigError

    assert cfg(fast__pack_multiple=False).fast.pack_multiple == 0  # YAML's bare off
    for bad in (-8, 100, True, "256x"):
        with pytest.raises(ConfigError, match=r"fast\.pack_multiple.*multiple of 8"):
            cfg(fast__pack_multiple=bad)
