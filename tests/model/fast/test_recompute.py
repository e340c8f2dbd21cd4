"""The fast path's own pieces around the kernels, on CPU: layer checkpointing (model/fast/recompute.py)
and MLP tiling against the plain model, the plan's micro-batch regrouping / offload / fused-optimizer
choices, and the lean QLoRA preparation. The CUDA-only part (offloaded copies on a side stream) has
its parity test in tests/model/fast/test_gpu.py."""

import copy
from types import SimpleNamespace

import pytest
import torch

from fast_helpers import cfg
from llamaft.model.fast import FastPlan, apply_fast_path, choose_plan, decoder_layers
from llamaft.model.fast import memory as mem
from llamaft.model.fast.recompute import install, tile_mlp


def tiny_lora(dropout=0.0, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    m = LlamaForCausalLM(c)
    return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))


def _loss_and_grads(model, ids, seed=5):
    torch.manual_seed(seed)  # same dropout masks for both models
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_layer_checkpointing_matches_plain_model(dropout):
    """Same loss and adapter gradients with every layer checkpointed (forward under no_grad,
    recompute in backward); dropout > 0 checks that the recompute replays the RNG."""
    ref = tiny_lora(dropout)
    ours = copy.deepcopy(ref)
    assert install(decoder_layers(ours), offload=True) == 3  # offload is a no-op off CUDA
    ids = torch.randint(0, 300, (2, 11))
    l1, g1 = _loss_and_grads(ref, ids)
    l2, g2 = _loss_and_grads(ours, ids)
    assert torch.allclose(l1, l2, atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) == 24
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-5), n
    ours.eval(), ref.eval()
    with torch.no_grad():  # eval / generation: the plain layer, nothing saved
        assert torch.allclose(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)


def test_checkpointing_trains_with_frozen_embeddings_and_wrapped_body():
    """The layer output needs a gradient even though nothing below it is trainable, and a wrapped
    body (compile in production) is what runs inside the checkpoint."""
    m = tiny_lora()
    calls = []

    def wrap(fn):
        def body(*a, **k):
            calls.append(torch.is_grad_enabled())
            return fn(*a, **k)
        return body

    install(decoder_layers(m), offload=False, wrap_body=wrap)
    ids = torch.randint(0, 300, (1, 9))
    _, grads = _loss_and_grads(m, ids)
    assert calls == [False] * 3 + [True] * 3  # forward without graph, then one recompute per layer
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_tiled_mlp_matches_plain_mlp_fwd_bwd(checkpointed):
    ref = tiny_lora()
    ours = copy.deepcopy(ref)
    for layer in decoder_layers(ours):
        tile_mlp(layer.mlp, rows=4)  # 2 x 11 tokens -> chunks of 4
    if checkpointed:  # as for long context: tiles checkpointed inside the layer's recompute
        install(decoder_layers(ours), offload=False)
    ids = torch.randint(0, 300, (2, 11))
    l1, g1 = _loss_and_grads(ref, ids)
    l2, g2 = _loss_and_grads(ours, ids)
    assert torch.allclose(l1, l2, atol=1e-6)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-5), n
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)


def test_apply_fast_path_uses_own_checkpointing_and_tiles():
    m = tiny_lora()
    plan = FastPlan(False, "sdpa", False, True, False, [], own_checkpointing=True, tile_mlp_rows=4)
    apply_fast_path(m, plan)
    layer = decoder_layers(m)[0]
    assert not getattr(layer, "gradient_checkpointing", False)  # HF's own flag stays off
    assert layer.forward.__name__ == "forward" and layer.mlp.forward.__name__ == "forward"
    assert "recompute" in layer.forward.__code__.co_filename and "recompute" in layer.mlp.forward.__code__.co_filename


# ---- plan: regrouping, offload, fused optimizer (the memory estimate is faked at 80 GB)
def _cuda_8b(monkeypatch, gib=79.1):
    import llamaft.model.fast.attention as att

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(att, "best_packed_attention", lambda: "varlen")
    monkeypatch.setattr(mem, "_card", lambda: (int(gib * 2**30), int(gib * 2**30), 0))  # a card, all free
    # a Llama-3.1-8B-shaped stand-in: config + parameter bytes, no weights
    c = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256)
    frozen = torch.empty(0).new_empty((8_030_000_000 // 2,), dtype=torch.float32, device="meta")  # 16 GB in bf16
    lora = torch.nn.Parameter(torch.empty((42_000_000,), device="meta"))
    frozen = torch.nn.Parameter(frozen, requires_grad=False)
    return SimpleNamespace(config=c, parameters=lambda: iter([frozen, lora]))


def w512(**over):
    return cfg(data__max_seq_length=512, train__micro_batch_size=8, train__gradient_accumulation=4, **over)


def test_plan_regroups_w512_lora_into_16x2(monkeypatch):
    model = _cuda_8b(monkeypatch)
    lens = [300] * 300 + [512] * 84  # W512-like: ~1 in 5 sequences at the cap
    p = choose_plan(w512(), model, lens)
    assert (p.micro_batch_size, p.gradient_accumulation, p.gradient_checkpointing) == (16, 2, False)
    assert p.fused_optimizer and not p.offload_checkpoints
    assert any("micro-batches 16 x 2" in r for r in p.reasons)
    # a short dataset bounds the tokens better: everything in one micro-batch
    assert choose_plan(w512(), model, [40] * 400).micro_batch_size == 32
    # a smaller card: checkpointing, with the shape of the cheapest estimated step -- 16 x 2 recomputes
    # fewer layers than 32 x 1 for one more micro-batch's launches; 8 x 4 recomputes none but pays 3 more
    model = _cuda_8b(monkeypatch, gib=40)
    small = choose_plan(w512(), model, lens)
    assert small.gradient_checkpointing and small.checkpoint_layers is not None
    assert (small.micro_batch_size, small.gradient_accumulation) == (16, 2), small.reasons
    why = next(r for r in small.reasons if r.startswith("micro-batches"))
    assert "32 x 1: ~11084 tokens, 22 of 32 recomputed; 16 x 2: ~5542 tokens, 12 of 32 recomputed; 8 x 4" in why
    c = w512()
    assert mem.step_cost(c, model, 2, 5542, 12) < min(mem.step_cost(c, model, 1, 11084, 22), mem.step_cost(c, model, 4, 2771, 0))
    # the per-micro-batch overhead shrinks with the layer's matrices (a 70B layer: ~4x the work per token)
    big = SimpleNamespace(config=SimpleNamespace(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                                 num_attention_heads=64, num_key_value_heads=8))
    assert 300 < mem.step_cost(c, big, 1, 0, 0) < 400 and mem.step_cost(c, model, 1, 0, 0) == mem.MICRO_BATCH_OVERHEAD_TOKENS
    # switched off, or no packing (padding grows with the batch): as configured
    model = _cuda_8b(monkeypatch)
    assert choose_plan(w512(fast__regroup_batches="off"), model, lens).micro_batch_size == 8
    assert choose_plan(w512(data__packing="off"), model, lens).micro_batch_size == 8


def test_plan_qlora_offloads_compiles_and_regroups_by_tokens(monkeypatch):
    model = _cuda_8b(monkeypatch)
    p = choose_plan(w512(model__method="qlora", train__optimizer="paged_adamw_8bit"), model, [300] * 384)
    assert p.gradient_checkpointing and p.own_checkpointing and p.offload_checkpoints and p.compile
    assert (p.micro_batch_size, p.gradient_accumulation) == (32, 1)  # ~9.6k tokens <= 11264
    assert p.cpu_embeddings and p.cpu_lm_head and p.nf4_kernel and not p.fused_optimizer and p.loss_chunk_rows == 256
    p = choose_plan(w512(model__method="qlora", fast__fused_loss="off"), model, [300] * 384)
    assert not p.cpu_lm_head  # the head is only idle outside the fused loss
    assert not choose_plan(w512(model__method="qlora", fast__cpu_lm_head="off", fast__nf4_kernel="off"), model, None).cpu_lm_head
    # longer examples: as many as fit the token target; already there, or lengths unknown -> as configured
    assert choose_plan(w512(model__method="qlora"), model, [700] * 384).micro_batch_size == 16
    assert choose_plan(w512(model__method="qlora"), model, [1500] * 384).micro_batch_size == 8
    assert choose_plan(w512(model__method="qlora"), model, None).micro_batch_size == 8
    p = choose_plan(w512(model__method="qlora", fast__offload_checkpoints="off", fast__compile="off",
                         fast__cpu_embeddings="off", fast__regroup_batches="off"), model, [300] * 384)
    assert p.gradient_checkpointing and not (p.offload_checkpoints or p.compile or p.cpu_embeddings)
    assert p.micro_batch_size == 8
    p = choose_plan(w512(train__gradient_checkpointing="on", fast__offload_checkpoints="on", fast__fused_optimizer="off"), model, None)
    assert p.offload_checkpoints and not p.fused_optimizer and not p.cpu_embeddings
    assert p.compile  # under our checkpointing the layer body is compiled inside it


def test_plan_keeps_hf_checkpointing_under_ddp(monkeypatch):
    model = _cuda_8b(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    p = choose_plan(w512(model__method="qlora"), model, [300] * 384)
    assert p.gradient_checkpointing and not p.own_checkpointing and not p.offload_checkpoints
    assert any("multi-process" in r for r in p.reasons)


def test_plan_tiles_mlp_only_for_long_micro_batches(monkeypatch):
    model = _cuda_8b(monkeypatch)
    assert choose_plan(w512(), model, None).tile_mlp_rows == 0
    long = cfg(data__max_seq_length=131072, train__micro_batch_size=1)
    assert choose_plan(long, model, None).tile_mlp_rows == 16384
    assert choose_plan(cfg(data__max_seq_length=131072, train__micro_batch_size=1, fast__tile_mlp="off"), model, None).tile_mlp_rows == 0


def test_training_arguments_follow_the_plan(monkeypatch, tmp_path):
    from llamaft.train import setup

    plan = FastPlan(True, "varlen", True, True, False, [], own_checkpointing=True, micro_batch_size=16,
                    gradient_accumulation=2, fused_optimizer=True)
    c = w512()
    monkeypatch.setattr(setup, "cuda_available", lambda: False)  # also when the suite runs on a GPU machine
    args = setup.training_arguments(c, tmp_path, bf16=False, fp16=False, has_eval=False,
                                    grad_ckpt=setup.gradient_checkpointing(c.train, plan), plan=plan)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 2)
    assert not args.gradient_checkpointing  # our checkpointing, not HF's
    assert args.optim == "adamw_torch"  # no CUDA: torch's fused AdamW only on the GPU
    monkeypatch.setattr(setup, "cuda_available", lambda: True)
    args = setup.training_arguments(c, tmp_path, bf16=False, fp16=False, has_eval=False, grad_ckpt=False, plan=plan)
    assert args.optim == "adamw_torch_fused"
    plain = setup.training_arguments(c, tmp_path, bf16=False, fp16=False, has_eval=False, grad_ckpt=True)
    assert (plain.per_device_train_batch_size, plain.gradient_accumulation_steps, plain.optim) == (8, 4, "adamw_torch")


def test_prepare_quantized_freezes_without_fp32_upcasts():
    from llamaft.model.adapters import prepare_quantized

    m = tiny_lora().get_base_model().to(torch.bfloat16)
    prepare_quantized(m)
    assert all(not p.requires_grad for p in m.parameters())
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}  # peft's prepare_model_for_kbit_training: fp32


# ---- frozen input embeddings in CPU memory (model/fast/embed.py)
def test_cpu_embeddings_same_outputs_and_gradients():
    from llamaft.model.fast.embed import embeddings_to_cpu, gather

    from llamaft.model.adapters import count_parameters

    ref = tiny_lora()
    ours = copy.deepcopy(ref)
    base = ours.get_base_model()
    assert embeddings_to_cpu(base)
    assert count_parameters(ours) == count_parameters(ref)  # still counted as part of the model
    names = [n for n, _ in ours.named_parameters()]
    assert not any("embed_tokens" in n for n in names)  # off the parameter list: model.device follows the layers
    assert base.get_input_embeddings().weight.shape == (300, 64)
    ids = torch.randint(0, 300, (2, 11))
    l1, g1 = _loss_and_grads(ref, ids)
    l2, g2 = _loss_and_grads(ours, ids)
    assert torch.allclose(l1, l2, atol=1e-6) and all(torch.allclose(g1[n], g2[n], atol=1e-6) for n in g1)
    w = torch.randn(10, 4)
    assert torch.equal(gather(w, torch.tensor([[3, 0], [9, 3]])), w[torch.tensor([[3, 0], [9, 3]])])


def test_cpu_embeddings_not_for_trained_or_tied_tables():
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaft.model.fast.embed import embeddings_to_cpu

    m = tiny_lora().get_base_model()
    m.get_input_embeddings().weight.requires_grad_(True)  # e.g. added tokens being trained
    assert not embeddings_to_cpu(m)
    c = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    tie_word_embeddings=True)
    tied = LlamaForCausalLM(c)
    tied.requires_grad_(False)
    assert not embeddings_to_cpu(tied)  # the lm_head reads the same table on the GPU
    assert "model.embed_tokens.weight" in dict(tied.named_parameters(remove_duplicate=False))


# ---- full fine-tuning under a memory budget: larger micro-batches, then partial checkpointing
def _cuda_8b_full(monkeypatch):
    m = _cuda_8b(monkeypatch)
    every = torch.nn.Parameter(torch.empty((8_030_000_000,), dtype=torch.bfloat16, device="meta"))
    m.parameters = lambda: iter([every])
    return m


def test_plan_full_ft_on_a_48_gb_card_steps_in_the_backward_and_checkpoints_only_some_layers(monkeypatch):
    """Full fine-tuning of 8B with 8-bit AdamW: weights + states + whole-model gradients (45 GiB) do
    not fit a 46 GiB budget; with the optimizer in the backward (no whole-model gradient) they do,
    and the rest of the budget keeps some layers' activations."""
    model = _cuda_8b_full(monkeypatch)
    lens = [300] * 300 + [512] * 84
    c = w512(model__method="full", train__optimizer="paged_adamw_8bit", fast__memory_gib=46)
    p = choose_plan(c, model, lens)
    assert p.unpaged_optimizer and p.optimizer_in_backward, p.reasons
    assert any("gradient clipping (train.max_grad_norm) is not applied" in r for r in p.reasons)
    assert p.gradient_checkpointing and p.own_checkpointing
    assert (p.micro_batch_size, p.gradient_accumulation) == (32, 1)  # the step happens in the one backward
    table, worst = p.checkpoint_tokens, 512 * 32
    assert len(table) == 33 and list(table) == sorted(table)  # more layers checkpointed -> more tokens fit
    assert p.checkpoint_layers == mem.layers_for(table, worst) and 0 < p.checkpoint_layers < 32, p.reasons
    layout = mem.Layout(in_backward=True)
    est = lambda k, t: mem.estimate_peak_bytes(c, model, k, t, 1, layout)  # noqa: E731
    plan_bytes = mem.budget_bytes(c)
    for k in range(33):  # each entry is the budget's exact edge (or the data's largest micro-batch)
        assert table[k] == -1 or est(k, table[k]) <= plan_bytes
        assert table[k] == worst or est(k, table[k] + 1) > plan_bytes
    # a typical micro-batch (W512: ~10k tokens) recomputes fewer layers than the worst case
    assert mem.layers_for(table, 10_300) < p.checkpoint_layers
    assert mem.layers_for(table, 100) == 0
    # whole-model gradients would not have fitted: the estimate says so
    assert mem.estimate_peak_bytes(c, model, True, worst, 1) > plan_bytes >= est(True, worst)
    # a larger budget: fewer layers recomputed; the card's own: no checkpointing, the optimizer after the backward
    roomier = choose_plan(w512(model__method="full", train__optimizer="paged_adamw_8bit", fast__memory_gib=52), model, lens)
    assert roomier.checkpoint_layers < p.checkpoint_layers
    free = choose_plan(w512(model__method="full", train__optimizer="paged_adamw_8bit"), model, [200] * 384)
    assert not free.gradient_checkpointing and not free.optimizer_in_backward
    # switched off: whole-model gradients, which do not fit -> every layer, over budget, said so
    off = choose_plan(w512(model__method="full", train__optimizer="adamw_8bit", fast__memory_gib=46,
                           fast__optimizer_in_backward="off"), model, lens)
    assert not off.optimizer_in_backward and off.checkpoint_layers == 32 and any("over budget" in r for r in off.reasons)
    # a budget too small even so: not chosen, and the line says why
    tiny = choose_plan(w512(model__method="full", train__optimizer="adamw_8bit", fast__memory_gib=30), model, lens)
    assert not tiny.optimizer_in_backward and any("would not fit either" in r for r in tiny.reasons)
    # torchao's 8-bit AdamW is not one train/in_backward.py builds: stepped after the backward, said so when asked
    ao = choose_plan(w512(model__method="full", train__optimizer="adamw_torch_8bit", fast__memory_gib=46,
                          fast__optimizer_in_backward="on"), model, lens)
    assert not ao.optimizer_in_backward and any("after the backward (train.optimizer=adamw_torch_8bit)" in r
                                                for r in ao.reasons)


def test_deferred_mlp_in_chunks_matches_plain_model(monkeypatch):
    """Every layer checkpointed, its MLP deferred to the backward in 7-token chunks (and chunked
    without grad): same loss and adapter gradients as the plain model, partial layers too; the
    recomputation never runs the MLP forward itself (each MLP runs once in the forward and once,
    chunk by chunk, in the backward)."""
    from llamaft.model.fast import recompute

    ref = tiny_lora()
    ours = copy.deepcopy(ref)
    plan = FastPlan(False, "sdpa", False, True, False, [], own_checkpointing=True, mlp_chunk_rows=7,
                    checkpoint_tokens=[15, 15, 30, 10**9])  # up to 15 tokens: no layer; 30: two; more: all
    apply_fast_path(ours, plan)
    runs = []
    real_body = recompute._DeferredMLP.forward
    monkeypatch.setattr(recompute._DeferredMLP, "forward",
                        staticmethod(lambda ctx, x, body, rows: runs.append(x.shape[-2]) or real_body(ctx, x, body, rows)))
    for n, deferred in ((11, 0), (22, 2), (40, 3)):
        ids = torch.randint(0, 300, (1, n))
        runs.clear()
        l1, g1 = _loss_and_grads(ref, ids)
        l2, g2 = _loss_and_grads(ours, ids)
        assert len(runs) == deferred, n  # one deferral per recomputed layer
        assert torch.allclose(l1, l2, atol=1e-6)
        for name in g1:
            assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-5), name
        ref.zero_grad(), ours.zero_grad()
    with torch.no_grad():  # evaluation: the chunked forward gives the same logits
        ids = torch.randint(0, 300, (1, 40))
        assert torch.allclose(ref(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)


def test_deferred_mlp_decider():
    from llamaft.model.fast import plan as P

    assert P.deferred_mlp(cfg(), True, True, False)[0] == P.MLP_CHUNK_ROWS
    assert P.deferred_mlp(cfg(), True, False, False) == (0, None)  # not memory-lean
    assert P.deferred_mlp(cfg(), False, True, False) == (0, None)  # HF's checkpointing
    assert P.deferred_mlp(cfg(model__method="full"), True, True, True) == (0, None)  # optimizer in the backward
    assert P.deferred_mlp(cfg(fast__deferred_mlp="off"), True, True, False) == (0, None)
    rows, why = P.deferred_mlp(cfg(lora__dropout=0.1), True, True, False)
    assert rows == 0 and "dropout" in why
    # the estimate: a deferred MLP's chunk instead of the whole micro-batch's intermediates
    import llamaft.model.fast.memory as mem
    from types import SimpleNamespace

    c = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256)
    frozen = torch.nn.Parameter(torch.empty((10**9,), device="meta"), requires_grad=False)
    m = SimpleNamespace(config=c, parameters=lambda: iter([frozen]))
    whole = mem.estimate_peak_bytes(cfg(), m, True, 12_000, 1, mem.Layout(offload=True))
    chunked = mem.estimate_peak_bytes(cfg(), m, True, 12_000, 1, mem.Layout(offload=True, mlp_rows=4096))
    assert whole - chunked == (12_000 - 4096) * 8 * 14336


def test_partial_checkpointing_by_tokens_matches_plain_model(monkeypatch):
    """The first layers checkpointed, how many chosen per micro-batch from its tokens (the others
    keep their activations): same loss and grads as the plain model."""
    from llamaft.model.fast import recompute

    calls = []
    real = recompute._Checkpoint.apply
    monkeypatch.setattr(recompute._Checkpoint, "apply", lambda *a: calls.append(1) or real(*a))
    ref = tiny_lora()
    ours = copy.deepcopy(ref)
    # up to 15 tokens: no layer; up to 30: the first two; more: all three
    plan = FastPlan(False, "sdpa", False, True, False, [], own_checkpointing=True, checkpoint_tokens=[15, 15, 30, 10**9])
    apply_fast_path(ours, plan)
    for n, recomputed in ((11, 0), (22, 2), (40, 3)):
        ids = torch.randint(0, 300, (1, n))
        calls.clear()
        l1, g1 = _loss_and_grads(ref, ids)
        l2, g2 = _loss_and_grads(ours, ids)
        assert len(calls) == recomputed, n
        assert torch.allclose(l1, l2, atol=1e-6)
        for name in g1:
            assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-5), name
        ref.zero_grad(), ours.zero_grad()
