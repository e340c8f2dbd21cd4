"""model.fast on CPU: the plan's decisions and fallbacks, and each kernel's reference logic
(packed attention boundaries, fused loss, fused LoRA) against the plain HF / PEFT path."""

import copy

import pytest
import torch

from fast_helpers import cfg
from llamaft.data.pack import flatten
from llamaft.model.fast import FastPlan, apply_fast_path, choose_plan, make_collator
from llamaft.model.fast.attention import cu_seqlens_from_position_ids, install_attention, packed_attention_reference
from llamaft.model.fast.loss import chunked_linear_cross_entropy, fused_causal_lm_loss, install_fused_loss, reference_causal_lm_loss
from llamaft.model.fast.lora import fuse_lora


def tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(c).eval()


def test_plan_cpu_is_all_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = choose_plan(cfg(), None)
    assert (p.packing, p.attention, p.fused_loss, p.gradient_checkpointing, p.compile, p.fused_lora) == (False, "sdpa", False, False, False, False)
    assert any("no CUDA" in r for r in p.reasons)
    p = choose_plan(cfg(data__packing="on", train__gradient_checkpointing="on"), None)
    assert p.packing and p.attention == "reference" and p.gradient_checkpointing


def test_plan_disabled_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = choose_plan(cfg(fast__enabled=False), None)
    assert not (p.packing or p.fused_loss or p.compile or p.fused_lora)
    assert any("fast.enabled=false" in r for r in p.reasons)


def test_plan_cuda_auto_and_switches(monkeypatch):
    import llamaft.model.fast.attention as att
    import llamaft.model.fast.memory as mem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(att, "best_packed_attention", lambda: "varlen")
    monkeypatch.setattr(mem, "needs_checkpointing", lambda c, m, t=None: (False, "fits"))
    p = choose_plan(cfg(), None)
    assert (p.packing, p.attention, p.fused_loss, p.gradient_checkpointing, p.compile, p.fused_lora) == (True, "varlen", True, False, True, True)
    p = choose_plan(cfg(data__packing="off", fast__fused_loss="off", fast__compile="off", train__gradient_checkpointing="on"), None)
    assert (p.packing, p.fused_loss, p.compile, p.gradient_checkpointing) == (False, False, False, True)
    p = choose_plan(cfg(fast__attention="sdpa"), None)
    assert p.attention == "sdpa" and not p.packing  # sdpa has no varlen path: no packing under auto
    monkeypatch.setattr(att, "best_packed_attention", lambda: None)  # older GPU / torch
    assert choose_plan(cfg(), None).attention == "sdpa"


def test_qlora_checkpoints_by_default(monkeypatch):
    from llamaft.model.fast.memory import needs_checkpointing

    assert needs_checkpointing(cfg(model__method="qlora"), None)[0]


def test_cu_seqlens_from_position_ids():
    cu, mx = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and mx == 4 and cu.dtype == torch.int32


def test_reference_attention_never_crosses_examples():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out = packed_attention_reference(q, k, v, cu)
    k2, v2 = k.clone(), v.clone()
    k2[:3] += 5.0; v2[:3] -= 3.0  # change only example 0's keys/values
    out2 = packed_attention_reference(q, k2, v2, cu)
    assert torch.equal(out[3:], out2[3:]) and not torch.allclose(out[:3], out2[:3])


def _per_example_logits(model, exs):
    return torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in exs])


def test_packed_model_equals_separate_examples():
    m = tiny()
    exs = [{"input_ids": torch.randint(0, 300, (n,)).tolist()} for n in (5, 9, 1, 3)]
    ref = _per_example_logits(m, exs)
    install_attention(m, "reference")
    b = flatten(exs)
    got = m(input_ids=b["input_ids"], position_ids=b["position_ids"], cu_seq_lens_q=b["cu_seq_lens_q"], max_length_q=b["max_length_q"]).logits[0]
    assert torch.allclose(got, ref, atol=1e-5)
    got2 = m(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0]  # boundaries from position_ids alone
    assert torch.allclose(got2, ref, atol=1e-5)


def test_padded_batch_still_works_with_packed_attention():
    m = tiny()
    ids = torch.randint(0, 300, (2, 6)); att = torch.ones(2, 6, dtype=torch.long); att[1, 4:] = 0
    ref = m(input_ids=ids, attention_mask=att).logits
    install_attention(m, "reference")
    assert torch.allclose(m(input_ids=ids, attention_mask=att).logits[0], ref[0], atol=1e-5)
    assert torch.allclose(m(input_ids=ids, attention_mask=att).logits[1, :4], ref[1, :4], atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_fused_loss_matches_reference_fwd_bwd(chunk):
    torch.manual_seed(chunk)
    h = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 13)); labels[0, 3:6] = -100
    ref = reference_causal_lm_loss(h, w, labels, 17)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    got = chunked_linear_cross_entropy(h, w, targets, 17, chunk=chunk)
    assert torch.allclose(got, ref, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(ref * 2, (h, w)), torch.autograd.grad(got * 2, (h, w))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)  # both upcast logits to fp32, as HF does
    assert torch.allclose(fused_causal_lm_loss(h, w, labels), reference_causal_lm_loss(h, w, labels))


def test_fused_loss_takes_fp32_hidden_with_bf16_head():
    """QLoRA: fp32 hidden states (norms kept in fp32) meet a bf16 lm_head; the gradient keeps the
    hidden states' dtype and matches the reference computed in the head's dtype."""
    torch.manual_seed(0)
    h = torch.randn(1, 9, 16, dtype=torch.float32, requires_grad=True)
    w = torch.randn(40, 16).to(torch.bfloat16)
    labels = torch.randint(0, 40, (1, 9))
    got = fused_causal_lm_loss(h, w, labels)
    (g,) = torch.autograd.grad(got, (h,))
    assert g.dtype == torch.float32
    h16 = h.detach().to(torch.bfloat16).requires_grad_()
    ref = reference_causal_lm_loss(h16, w, labels)
    (gr,) = torch.autograd.grad(ref, (h16,))
    assert abs(got.item() - ref.item()) < 2e-2
    assert torch.allclose(g, gr.float(), atol=2e-2, rtol=5e-2)


def test_fused_loss_in_model_matches_hf():
    m = tiny()
    ids = torch.randint(0, 300, (1, 20)); labels = ids.clone(); labels[0, :5] = -100
    ref = m(input_ids=ids, labels=labels).loss
    assert install_fused_loss(m)
    out = m(input_ids=ids, labels=labels)
    assert out.logits is None and torch.allclose(out.loss, ref, atol=1e-5)
    assert m(input_ids=ids).logits.shape == (1, 20, 300)  # no labels: the original forward


def test_fused_lora_matches_peft_fwd_bwd():
    from peft import LoraConfig, get_peft_model

    ref = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    fast = copy.deepcopy(ref)
    assert fuse_lora(fast) == 4
    ids = torch.randint(0, 300, (2, 9))
    l1, l2 = ref(input_ids=ids, labels=ids).loss, fast(input_ids=ids, labels=ids).loss
    l1.backward(); l2.backward()
    assert torch.allclose(l1, l2, atol=1e-6)
    for (n, p), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, p2.grad, atol=1e-6, rtol=1e-4), n
    with fast.disable_adapter():  # other states fall back to PEFT's own forward
        with ref.disable_adapter():
            assert torch.allclose(fast(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)


def test_trainer_packed_fast_path_matches_padded_hf():
    """Same data, same seed: packed rows + reference attention + fused loss + fused LoRA give the
    per-step losses of the plain padded HF path."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 300, (int(n),), generator=g).tolist()} for n in torch.randint(3, 30, (16,), generator=g)]
    losses = {}
    for fast in (False, True):
        m = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
        plan = FastPlan(True, "reference", True, False, False, [], fused_lora=True) if fast else FastPlan(False, "sdpa", False, False, False, [])
        m = apply_fast_path(m, plan)
        args = TrainingArguments(output_dir="/tmp/llamaft_test_fast", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 max_steps=2, logging_steps=1, report_to=[], save_strategy="no", learning_rate=1e-2,
                                 use_cpu=True, seed=0, remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=True)
        tr = Trainer(model=m, args=args, train_dataset=rows, data_collator=make_collator(plan, 0))
        tr.train()
        losses[fast] = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_fused_loss_bf16_head_gradient_accumulates_over_chunks_within_bf16_rounding():
    """Full fine-tuning: the lm_head gradient accumulates in bf16 chunk by chunk (no fp32 [V, H]
    buffer); over 8 chunks it stays within a few bf16 roundings of the float64 gradient."""
    torch.manual_seed(3)
    h = torch.randn(1, 64, 32, dtype=torch.float64)
    w = torch.randn(100, 32, dtype=torch.float64) * 0.1
    labels = torch.randint(0, 100, (1, 64))
    (exact,) = torch.autograd.grad(reference_causal_lm_loss(h, w.requires_grad_(), labels), (w,))
    wb = w.detach().to(torch.bfloat16).requires_grad_()
    loss = fused_causal_lm_loss(h.to(torch.bfloat16), wb, labels, chunk=8)
    (got,) = torch.autograd.grad(loss, (wb,))
    assert got.dtype == torch.bfloat16
    err = (got.double() - exact).norm() / exact.norm()
    assert err < 2e-2, err
