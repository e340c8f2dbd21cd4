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


# ---- each decider of model/fast/plan.py alone: (value, reason) from the config, the facts and
# earlier decisions (memory estimates faked where a decider asks memory.py)
from llamaft.model.fast import plan as P  # noqa: E402


def test_fast_path_decider():
    assert P.fast_path(cfg(), P.Facts(cuda=True)) == (True, None)
    off, why = P.fast_path(cfg(), P.Facts(cuda=False))
    assert not off and why.startswith("fast path off (no CUDA device)")
    assert "fast.enabled=false" in P.fast_path(cfg(fast__enabled=False), P.Facts(cuda=True))[1]


def test_plain_path_deciders():
    assert P.plain_packing(cfg()) == ((False, "sdpa"), None)
    assert P.plain_packing(cfg(fast__attention="eager"))[0] == (False, "eager")
    (packing, attention), why = P.plain_packing(cfg(data__packing="on"))
    assert packing and attention == "reference" and "per-example reference" in why
    assert P.plain_packing(cfg(data__packing="on", fast__attention="flex"))[0] == (True, "flex")
    assert P.plain_checkpointing(cfg(train__gradient_checkpointing="auto")) == (
        False, "gradient checkpointing off (train.gradient_checkpointing=auto)")
    assert P.plain_checkpointing(cfg(train__gradient_checkpointing="on"))[0]


def test_attention_and_packing_deciders():
    assert P.attention_kernel(cfg(), "varlen") == ("varlen", "attention varlen (auto: best packed kernel on this torch/GPU)")
    assert P.attention_kernel(cfg(), None)[0] == "sdpa"
    assert P.attention_kernel(cfg(fast__attention="flex"), "varlen") == ("flex", "attention flex (fast.attention)")
    assert P.packing_mode(cfg(), "varlen") == (True, "packing on (auto): no pad tokens between examples")
    assert P.packing_mode(cfg(), "sdpa") == (False, "packing off (auto: attention sdpa has no varlen path here)")
    assert P.packing_mode(cfg(data__packing="on"), "sdpa")[0]
    assert P.packing_mode(cfg(data__packing="off"), "varlen") == (False, "packing off (data.packing=off)")


def test_loss_deciders():
    assert P.fused_loss(cfg()) == (True, "fused loss on (fast.fused_loss=auto)")
    assert not P.fused_loss(cfg(fast__fused_loss="off"))[0]
    assert P.loss_chunk_rows(True) == (P.QLORA_LOSS_CHUNK_ROWS, None)  # memory-lean (qlora, or lora on a small card)
    assert P.loss_chunk_rows(False) == (None, None)
    assert P.single_sequence_sdpa(cfg(), "flex") == (True, None)  # logged only where varlen runs
    assert P.single_sequence_sdpa(cfg(fast__single_sequence_sdpa="off"), "varlen") == (
        False, "rows holding one example: varlen (fast.single_sequence_sdpa=off)")


def test_checkpointing_decider_asks_the_estimate_only_under_auto(monkeypatch):
    import llamaft.model.fast.memory as mem

    asked = []
    monkeypatch.setattr(mem, "needs_checkpointing", lambda c, m, t: asked.append(t) or (True, "too big"))
    assert P.checkpointing(cfg(), None, 4096) == (True, "gradient checkpointing on (auto: too big)") and asked == [4096]
    assert P.checkpointing(cfg(train__gradient_checkpointing="off"), None, 1) == (
        False, "gradient checkpointing off (train.gradient_checkpointing)") and asked == [4096]


def test_own_checkpointing_and_offload_deciders():
    assert P.own_checkpointing(True, False) == (True, None)
    assert P.own_checkpointing(False, True) == (False, None)
    own, why = P.own_checkpointing(True, True)  # DDP: HF's non-reentrant checkpointing
    assert not own and "multi-process" in why
    assert P.offload_checkpoints(cfg(model__method="qlora"), True, True) == (True, "checkpoints offloaded to CPU (auto: qlora: memory-lean)")
    assert P.offload_checkpoints(cfg(), True, False) == (False, "checkpoints kept on the GPU (auto: not memory-lean)")
    assert P.offload_checkpoints(cfg(), True, True) == (True, "checkpoints offloaded to CPU (auto: memory-lean plan)")
    assert P.offload_checkpoints(cfg(fast__offload_checkpoints="on"), True, False)[0]
    assert P.offload_checkpoints(cfg(model__method="qlora"), False, True) == (False, None)  # nothing of ours to offload


def test_micro_batches_decider(monkeypatch):
    import llamaft.model.fast.memory as mem

    w = dict(train__micro_batch_size=8, train__gradient_accumulation=4)
    monkeypatch.setattr(mem, "regroup", lambda c, m, tokens_of, checkpointing, layout: (16, 2, f"fits (ckpt={checkpointing})"))
    assert P.micro_batches(cfg(**w), None, None, None, True, False, False) == (
        (16, 2), "micro-batches 16 x 2 accumulation (fast.regroup_batches=auto: fits (ckpt=False))")
    monkeypatch.setattr(mem, "partial_regroup", lambda c, m, lengths, tokens_of, layout: (16, 2, "cheapest"))
    # our checkpointing, layers recomputed per micro-batch: the cheapest shape; every layer: the largest
    assert P.micro_batches(cfg(**w), None, None, None, True, True, True)[1].endswith("(fast.regroup_batches=auto: cheapest)")
    assert P.micro_batches(cfg(fast__partial_checkpointing="off", **w), None, None, None, True, True, True)[1].endswith(
        "(ckpt=True))")
    assert P.micro_batches(cfg(**w), None, None, None, True, True, False) == ((8, 4), None)  # HF's checkpointing
    assert P.micro_batches(cfg(**w), None, None, None, False, False, False) == ((8, 4), None)  # no packing
    assert P.micro_batches(cfg(fast__regroup_batches="off", **w), None, None, None, True, False, False) == ((8, 4), None)
    (mbs, ga), why = P.micro_batches(cfg(model__method="qlora", **w), None, [300] * 64, None, True, True, True, True)
    assert (mbs, ga) == (32, 1) and f"<= {P.QLORA_MICRO_BATCH_TOKENS}" in why  # by tokens, no model to size
    # the optimizer in the backward needs one micro-batch per step
    assert P.micro_batches(cfg(**w), None, None, None, True, True, True, layout=mem.Layout(in_backward=True)) == (
        (32, 1), "micro-batches 32 x 1 accumulation (optimizer in the backward)")


def test_partial_checkpointing_decider(monkeypatch):
    import llamaft.model.fast.memory as mem

    monkeypatch.setattr(mem, "checkpoint_table", lambda c, m, worst, ga, layout: [10, 20, 10**6])
    (table, layers), why = P.partial_checkpointing(cfg(), None, True, 15, 1)
    assert table == (10, 20, 10**6) and layers == 1 and why.endswith("(fast.partial_checkpointing=auto)")
    assert P.partial_checkpointing(cfg(fast__partial_checkpointing="off"), None, True, 15, 1) == (
        (None, None), "checkpointing every layer (fast.partial_checkpointing=off)")
    for c, own, lean in ((cfg(), False, False), (cfg(train__gradient_checkpointing="on"), True, False),
                         (cfg(model__method="qlora"), True, True), (cfg(), True, True)):
        assert P.partial_checkpointing(c, None, own, 15, 1, lean) == ((None, None), None)


def test_tile_optimizer_compile_lora_nf4_deciders():
    assert P.tile_mlp(cfg(data__max_seq_length=131072, train__micro_batch_size=1))[0] == P.TILE_MLP_ROWS
    assert P.tile_mlp(cfg(data__max_seq_length=16384, train__micro_batch_size=1)) == (0, None)
    # the deferred MLP chunks long micro-batches already, without the tiles' second MLP forward
    assert P.tile_mlp(cfg(data__max_seq_length=131072, train__micro_batch_size=1), 16384) == (0, None)
    assert P.fused_optimizer(cfg()) == (True, "torch fused AdamW on (fast.fused_optimizer=auto)")
    assert P.fused_optimizer(cfg(fast__fused_optimizer="off"))[0] is False
    assert P.fused_optimizer(cfg(train__optimizer="paged_adamw_8bit")) == (False, None)
    assert P.compile_blocks(cfg(), False) == (True, "torch.compile on (auto: measured to win here)")
    assert P.compile_blocks(cfg(), True)[0] is False  # LoRA under HF's checkpointing: not measured
    assert P.compile_blocks(cfg(), True, own=True)[0]  # under ours: full fine-tuning's partial plan
    assert P.compile_blocks(cfg(), True, lean=True)[0]  # ... but its memory-lean plan is qlora's
    assert P.compile_blocks(cfg(model__method="full"), True)[0] and P.compile_blocks(cfg(model__method="qlora"), True)[0]
    assert P.compile_blocks(cfg(fast__compile="off"), False) == (False, "torch.compile off (fast.compile=off)")
    assert P.fused_lora()[0] is True
    stacked = type("Stacked", (), {"peft_config": {"default": None, "frozen": None}})()
    assert P.fused_lora(stacked) == (False, "fused LoRA linears off: two adapters stacked (model.from_run: stack) run PEFT's forward")
    assert P.nf4_kernel(cfg()) == (False, None)
    assert P.nf4_kernel(cfg(model__method="qlora"))[0] and not P.nf4_kernel(cfg(model__method="qlora", fast__nf4_kernel="off"))[0]


def test_where_frozen_weights_live_deciders():
    assert P.cpu_embeddings(cfg(model__method="qlora"), True) == (True, "input embeddings in CPU memory when frozen and untied (fast.cpu_embeddings=auto)")
    assert P.cpu_embeddings(cfg(), False) == (False, "input embeddings on the GPU (fast.cpu_embeddings=auto)")
    assert P.cpu_embeddings(cfg(fast__cpu_embeddings="on"))[0]
    assert P.cpu_lm_head(cfg(model__method="qlora"), True, True)[0]
    assert not P.cpu_lm_head(cfg(model__method="qlora"), False, True)[0]  # only the fused loss leaves it idle
    assert P.cpu_lm_head(cfg(fast__cpu_lm_head="on"), True)[0] and not P.cpu_lm_head(cfg(), True)[0]
    assert not P.cpu_lm_head(cfg(fast__cpu_lm_head="off"), True, True)[0]


def test_model_fit_deciders():
    unknown, none = P.ModelFits(), P.ModelFits(layers=False, embeddings=False, fused_loss=False, park_head=False)
    assert P.embeddings_fit(True, unknown) == (True, None)
    assert P.embeddings_fit(True, none)[0] is False and "stay on the GPU" in P.embeddings_fit(True, none)[1]
    assert P.embeddings_fit(False, none) == (False, None)
    assert P.fused_loss_fits(True, none) == (False, "fused loss off: lm_head is not a plain bias-free nn.Linear")
    assert P.lm_head_fits(True, True, unknown) == (True, None)
    assert P.lm_head_fits(True, False, unknown)[0] is False  # the fused loss itself did not fit
    assert P.lm_head_fits(True, True, none)[0] is False
    assert P.layers_fit(True, True, none) == ((False, False), None)  # HF's checkpointing instead
    assert P.layers_fit(True, True, unknown) == ((True, True), None)


def test_facts_and_model_fits(monkeypatch):
    from llamaft.model.fast.install import model_fits

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    f = P.read_facts(cfg(), tiny())
    assert (f.cuda, f.packed_kernel, f.distributed) == (False, None, True)
    assert f.fits == P.ModelFits(layers=True, embeddings=False, fused_loss=True, park_head=False)  # trained table, CPU head
    assert model_fits(None) == P.ModelFits() and model_fits(object()) == P.ModelFits()  # stand-ins say nothing
    frozen = tiny().requires_grad_(False)
    assert model_fits(frozen).embeddings
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not P._cuda_target(tiny()) and P._cuda_target(None)  # a CPU model stays on the plain path


def test_plan_is_frozen_and_names_its_checkpointing():
    import dataclasses

    p = FastPlan(False, "sdpa", False, True, False, ["a"], own_checkpointing=True, checkpoint_tokens=[1, 2])
    assert p.reasons == ("a",) and p.checkpoint_tokens == (1, 2) and p.checkpointing == "partial"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.fused_loss = True
    assert dataclasses.replace(p, checkpoint_tokens=None).checkpointing == "own"
    assert dataclasses.replace(p, own_checkpointing=False).checkpointing == "hf"
    assert dataclasses.replace(p, gradient_checkpointing=False).checkpointing == "none"


def test_install_never_changes_the_plan_and_refuses_a_plan_for_another_model():
    from llamaft.data.collate import Collator
    from llamaft.data.pack import PackedCollator

    plan = FastPlan(True, "reference", True, False, False, ["x"], fused_lora=True, cpu_embeddings=True)
    before = copy.deepcopy(plan)
    apply_fast_path(tiny().requires_grad_(False), plan)
    assert plan == before
    with pytest.raises(ValueError, match="choose_plan"):  # a trained table cannot go to CPU memory
        apply_fast_path(tiny(), plan)
    assert isinstance(make_collator(plan, 0), PackedCollator)
    assert isinstance(make_collator(FastPlan(False, "sdpa", False, False, False), 7), Collator)


def test_memory_budget_is_device_level(monkeypatch):
    """The budget is the card's free memory (plus what our allocator holds) or fast.memory_gib, and
    in both cases what the process adds outside torch's allocator is taken off before the cap."""
    import llamaft.model.fast.memory as mem

    gib = 2**30
    free_card = mem.make_budget(None, 70 * gib, 80 * gib, 2 * gib)  # 8 GiB used by others / our context
    assert free_card.device_bytes == 72 * gib and free_card.cap_bytes == 72 * gib - mem.LATER_OUTSIDE_BYTES
    assert free_card.plan_bytes < free_card.cap_bytes and "free memory" in free_card.source
    asked = mem.make_budget(16, 70 * gib, 80 * gib, 2 * gib)
    assert asked.device_bytes == 16 * gib and asked.cap_bytes == 16 * gib - mem.OUTSIDE_ALLOCATOR_BYTES
    assert "fast.memory_gib=16" in asked.describe()
    # a promise the card cannot keep: capped at what is there, and said so
    short = mem.make_budget(40, 10 * gib, 80 * gib, 0)
    assert short.cap_bytes == 10 * gib - mem.LATER_OUTSIDE_BYTES and "only 10.0 GiB free" in short.source
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mem, "_card", lambda: (70 * gib, 80 * gib, 2 * gib))
    assert mem.budget_bytes(cfg(fast__memory_gib=16)) == asked.plan_bytes
    assert mem.read_budget(cfg()) == free_card


def test_memory_cap_is_installed_and_lifted(monkeypatch):
    """apply_fast_path caps torch's allocator at the budget on the model's CUDA device; restore_parked
    (after training) lifts it. A CPU model is never capped."""
    import llamaft.model.fast.memory as mem
    from llamaft.model.fast import apply_fast_path, restore_parked

    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    budget = mem.make_budget(16, 70 * 2**30, 80 * 2**30, 0)
    plan = FastPlan(False, "sdpa", False, False, False, budget=budget)
    apply_fast_path(tiny(), plan)
    assert calls == []  # on the CPU
    import llamaft.model.fast.install as inst

    monkeypatch.setattr(inst, "model_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(inst, "install_attention", lambda *a: None)
    apply_fast_path(tiny(), plan)
    assert calls == [(budget.cap_bytes / budget.total_bytes, torch.device("cuda", 0))]
    restore_parked(tiny())
    assert calls[-1] == (1.0, None)


def test_micro_batch_tokens():
    import llamaft.model.fast.memory as mem

    assert mem.micro_batch_tokens(cfg(data__max_seq_length=100), None)(3) == 300
    tokens_of = mem.micro_batch_tokens(cfg(data__max_seq_length=100), [50, 300, 20])
    assert (tokens_of(1), tokens_of(2), tokens_of(4)) == (100, 150, 270)  # longest first, capped; then the cap


def test_compiled_layers_under_ddp_skip_dynamos_ddp_optimizer(monkeypatch):
    """Several processes: dynamo's DDPOptimizer (graph splits at gradient buckets) is off before any
    layer is compiled -- on 2 x H200 it failed to compile a decoder layer; one process: left as is."""
    from llamaft.model.fast.compile import compile_blocks

    # torch's own config patch, not monkeypatch: monkeypatch's undo left optimize_ddp deleted from
    # dynamo's config, and every later torch.compile in the session failed reading it
    with torch._dynamo.config.patch(optimize_ddp=True):
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert compile_blocks([torch.nn.Linear(2, 2)]) == 1 and torch._dynamo.config.optimize_ddp is True
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert compile_blocks([torch.nn.Linear(2, 2)]) == 1 and torch._dynamo.config.optimize_ddp is False
    assert torch._dynamo.config.optimize_ddp is not None  # still there after the test
