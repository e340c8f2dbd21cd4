"""GPU parity tests of the fast kernels against their plain references (fresh random inputs,
forward and backward). Run on the device: pytest -m gpu tests/model/fast/test_gpu.py"""

import pytest
import torch

from llamaft.model.fast.attention import (
    best_packed_attention, packed_attention_flex, packed_attention_reference, packed_attention_varlen,
    single_attention_sdpa,
)
from llamaft.model.fast.loss import fused_causal_lm_loss, reference_causal_lm_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _qkv(lens, hq=32, hkv=8, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lens)
    mk = lambda h: torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()  # noqa: E731
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return mk(hq), mk(hkv), mk(hkv), cu


def _grads(fn, q, k, v, go):
    out = fn(q, k, v)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), go)
    return out, gq, gk, gv


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
@pytest.mark.parametrize("lens", [[7, 300, 1, 129, 512], [2048], [64] * 33])
def test_packed_attention_matches_reference(kernel, lens):
    if kernel == "varlen" and best_packed_attention() != "varlen":
        pytest.skip("varlen_attn not available")
    q, k, v, cu = _qkv(lens, seed=len(lens))
    go = torch.randn_like(q)
    mx = max(lens)
    fast = {"varlen": lambda a, b, c: packed_attention_varlen(a, b, c, cu, mx),
            "flex": lambda a, b, c: packed_attention_flex(a, b, c, cu)}[kernel]
    ref = _grads(lambda a, b, c: packed_attention_reference(a.float(), b.float(), c.float(), cu).to(a.dtype), q, k, v, go)
    got = _grads(fast, q, k, v, go)
    for name, r, x in zip(("out", "dq", "dk", "dv"), ref, got):
        err = (r.float() - x.float()).abs().max().item()
        scale = r.float().abs().max().item()
        assert err <= 2e-2 * max(scale, 1.0), f"{kernel} {name}: max err {err} (scale {scale})"


@pytest.mark.parametrize("train_head", [False, True])
def test_fused_loss_matches_reference(train_head):
    torch.manual_seed(1)
    n, h, v = 3000, 512, 128256
    hid = (torch.randn(1, n, h, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(train_head)
    labels = torch.randint(0, v, (1, n), device="cuda")
    labels[0, ::7] = -100
    items = int((labels[0, 1:] != -100).sum()) + 5  # an explicit Trainer-style denominator
    ref = reference_causal_lm_loss(hid, w, labels, items)
    got = fused_causal_lm_loss(hid, w, labels, items)
    assert abs(ref.item() - got.item()) < 1e-4 * abs(ref.item())
    params = (hid, w) if train_head else (hid,)
    gr = torch.autograd.grad(ref * 3.0, params)
    gg = torch.autograd.grad(got * 3.0, params)
    for r, x in zip(gr, gg):
        assert (r.float() - x.float()).abs().max().item() <= 1e-2 * r.float().abs().max().item() + 1e-6


def test_fused_loss_memory_is_chunked():
    # the point of the fused loss: peak extra memory is one chunk, not T x vocab logits
    n, h, v = 16384, 256, 128256
    hid = torch.randn(1, n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, v, (1, n), device="cuda")
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_causal_lm_loss(hid, w, labels).backward()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * v * 2  # under the bf16 logits alone (4 GiB here; HF's path needs ~5x that)


@pytest.mark.parametrize("dense", [True, False])
def test_fused_lora_matches_peft(dense):
    import copy

    from peft import LoraConfig, get_peft_model

    from llamaft.model.fast.lora import fuse_lora

    torch.manual_seed(2)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(1024, 2048, bias=False)

        def forward(self, x):
            return self.q(x)

    ref = get_peft_model(M().cuda().to(torch.bfloat16), LoraConfig(r=16, lora_alpha=32, target_modules=["q"], init_lora_weights=False))
    fast = copy.deepcopy(ref)
    if not dense:  # exercise the any-base path (as for bnb 4-bit bases)
        fast.base_model.model.q.base_layer.__class__ = type("Other", (torch.nn.Linear,), {})
    assert fuse_lora(fast) == 1
    x = torch.randn(3000, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3000, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y1, y2 = ref(x), fast(x2)
    y1.backward(g); y2.backward(g)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(y2, y1) < 1e-2 and rel(x2.grad, x.grad) < 1e-2
    for (n, p), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        if p.requires_grad:
            assert p2.grad.dtype == p.grad.dtype and rel(p2.grad, p.grad) < 1e-2, n


def test_varlen_hf_attention_accepts_fp32_inputs_from_qlora():
    """fp32 q/k/v (an fp32 model under autocast, or norms upcast by peft's prepare_model_for_kbit_training)
    reach attention in fp32; the varlen path must run them in bf16 and give back fp32, matching the
    fp32 reference."""
    if best_packed_attention() != "varlen":
        pytest.skip("varlen_attn not available")
    from types import SimpleNamespace

    from llamaft.model.fast.attention import _make_hf_attention

    lens = [5, 60, 3]
    q, k, v, cu = _qkv(lens, hq=8, hkv=2, d=64, seed=3)
    q32, k32, v32 = (x.detach().float().transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, T, D]
    pos = torch.cat([torch.arange(n, device="cuda") for n in lens]).unsqueeze(0)
    out, _ = _make_hf_attention("varlen")(SimpleNamespace(), q32, k32, v32, None, scaling=64 ** -0.5, position_ids=pos)
    assert out.dtype == torch.float32
    ref = packed_attention_reference(q.detach().float(), k.detach().float(), v.detach().float(), cu)
    assert (out[0] - ref).abs().max().item() < 2e-2


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_offloaded_checkpointing_matches_plain_model(compiled, deferred):
    """Every layer's input goes to pinned CPU memory on a side stream and comes back (prefetched) for
    the recompute: same loss and adapter gradients as the plain model, in bf16 on the GPU; with
    `deferred`, each MLP also runs in the backward in 128-token chunks (recompute.defer_mlp)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaft.model.fast import decoder_layers
    from llamaft.model.fast.compile import compile_fn
    from llamaft.model.fast.recompute import install

    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, use_cache=False)
    ref = get_peft_model(LlamaForCausalLM(c).cuda().to(torch.bfloat16),
                         LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    ours = copy.deepcopy(ref)
    wrap = compile_fn if compiled else None
    if deferred:
        from llamaft.model.fast.recompute import defer_mlp

        for layer in decoder_layers(ours):
            defer_mlp(layer.mlp, 128, wrap_body=wrap)
    install(decoder_layers(ours), offload=True, wrap_body=wrap)
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    grads = []
    for m in (ref, ours):
        m.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        if m is ours:
            chain = decoder_layers(ours)[0].forward.__closure__  # the shared chain holds CPU copies now
            saved = [cell.cell_contents for cell in chain if type(cell.cell_contents).__name__ == "_Chain"][0].last
            assert saved.cpu is not None and saved.cpu.is_pinned() and saved.gpu is None
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = grads
    assert abs(l1.item() - l2.item()) < 1e-2
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    for n in g1:
        assert rel(g2[n], g1[n]) < 3e-2, n


@pytest.mark.parametrize("hkv", [8, 32])
def test_single_example_sdpa_matches_reference_fwd_bwd(hkv):
    """One example per row (long context): causal SDPA on cuDNN/flash vs the fp32 reference, and the
    HF-facing varlen function takes that path only when the row holds exactly one example."""
    from types import SimpleNamespace

    from llamaft.model.fast.attention import _make_hf_attention

    q, k, v, cu = _qkv([3000], hkv=hkv, seed=7)
    go = torch.randn_like(q)
    ref = _grads(lambda a, b, c: packed_attention_reference(a.float(), b.float(), c.float(), cu), q, k, v, go.float())
    got = _grads(lambda a, b, c: single_attention_sdpa(a, b, c), q, k, v, go)
    for r, g in zip(ref, got):
        assert ((g.float() - r).norm() / r.norm()).item() < 2e-2
    calls = []
    import llamaft.model.fast.attention as att

    orig = att.single_attention_sdpa
    att.single_attention_sdpa = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
    try:
        fn = _make_hf_attention("varlen", single_sdpa=True)
        as_hf = lambda x: x.detach().transpose(0, 1).unsqueeze(0)  # noqa: E731
        fn(SimpleNamespace(), as_hf(q), as_hf(k), as_hf(v), None, position_ids=torch.arange(3000, device="cuda")[None])
        two = torch.cat([torch.arange(1000), torch.arange(2000)]).cuda()[None]
        fn(SimpleNamespace(), as_hf(q), as_hf(k), as_hf(v), None, position_ids=two)
    finally:
        att.single_attention_sdpa = orig
    assert calls == [1]


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (3, 64 * 5)])
def test_nf4_triton_dequant_matches_bitsandbytes(nested, shape):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from llamaft.model.fast.nf4 import dequantize_state, reference_dequantize_nf4, triton_available

    if not triton_available():
        pytest.skip("triton not available")
    torch.manual_seed(len(shape) + shape[0])
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.05
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, quant_storage=torch.uint8)
    want = bnbf.dequantize_4bit(packed, state)
    got = dequantize_state(packed, state, torch.bfloat16)
    ref = dequantize_state(packed, state, torch.bfloat16, kernel=reference_dequantize_nf4)
    assert got.shape == want.shape and got.dtype == want.dtype
    # identical arithmetic up to fp32 rounding of the nested absmax (an FMA may round once instead
    # of twice): every value within one bf16 step, and all but a handful bit-identical
    for name, x in (("triton", got), ("reference", ref)):
        diff = (x.float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2 ** -7).all(), name
        assert (x != want).float().mean().item() < 1e-4, name


@pytest.mark.parametrize("peft_bnb_class", [True, False])
def test_nf4_lora_matches_peft_on_bitsandbytes_fwd_bwd_and_compiles(peft_bnb_class):
    pytest.importorskip("bitsandbytes")
    import copy

    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from llamaft.model.fast.lora import fuse_lora

    torch.manual_seed(3)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = bnb.nn.Linear4bit(1024, 2048, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                       compress_statistics=True)

        def forward(self, x):
            return self.q(x)

    m = M()
    m.q.weight = bnb.nn.Params4bit(torch.randn(2048, 1024) * 0.05, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    # a model loaded by transformers in 4 bit says so, and PEFT then wraps with its own bnb LoRA class
    m.is_loaded_in_4bit = peft_bnb_class
    ref = get_peft_model(m.cuda(), LoraConfig(r=16, lora_alpha=32, target_modules=["q"], init_lora_weights=False))
    assert (type(ref.base_model.model.q).__module__ == "peft.tuners.lora.bnb") == peft_bnb_class
    fast = copy.deepcopy(ref)
    assert fuse_lora(fast, nf4=True) == 1
    x = torch.randn(3000, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3000, 2048, device="cuda", dtype=torch.bfloat16)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    y1 = ref(x)
    (gx1,) = torch.autograd.grad(y1, (x,), g, retain_graph=True)
    y1.backward(g)
    for run in (fast, torch.compile(fast, dynamic=True)):
        xx = x.detach().clone().requires_grad_()
        for p in fast.parameters():
            p.grad = None
        y2 = run(xx)
        y2.backward(g)
        assert rel(y2, y1) < 1e-2 and rel(xx.grad, gx1) < 1e-2
        for (n, p), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
            if p.requires_grad:
                assert p2.grad.dtype == p.grad.dtype and rel(p2.grad, p.grad) < 1e-2, n


def test_parked_lm_head_same_loss_and_grads_frees_memory_between_losses():
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaft.model.fast import restore_parked
    from llamaft.model.fast.loss import install_fused_loss

    torch.manual_seed(4)
    c = LlamaConfig(vocab_size=128256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    ref = LlamaForCausalLM(c).cuda().to(torch.bfloat16)
    for p in ref.parameters():
        p.requires_grad_(False)
    for layer in ref.model.layers:
        layer.mlp.down_proj.weight.requires_grad_(True)
    ours = copy.deepcopy(ref)
    assert install_fused_loss(ref) and install_fused_loss(ours, park_head=True)
    parked = ours._llamaft_parked_head
    assert parked is not None
    ids = torch.randint(0, 128256, (1, 300), device="cuda")
    head_bytes = ours.lm_head.weight.numel() * 2  # 64 MiB; this forward's activations: a few MiB
    for step in range(2):  # the second forward brings it back through the layer pre-hook
        l1 = ref(input_ids=ids, labels=ids).loss
        before = torch.cuda.memory_allocated()
        l2 = ours(input_ids=ids, labels=ids).loss
        assert ours.lm_head.weight.device.type == "cpu"  # parked right after the loss
        if step == 0:  # resident before, freed after: the forward left less allocated than it found
            assert torch.cuda.memory_allocated() - before < -head_bytes // 2
        assert torch.equal(l1, l2), step
        l1.backward(); l2.backward()
        for a, b in zip(ref.model.layers, ours.model.layers):
            assert torch.equal(a.mlp.down_proj.weight.grad, b.mlp.down_proj.weight.grad)
    with torch.no_grad():  # generation / evaluation without labels: back on the GPU, same logits
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert ours.lm_head.weight.is_cuda
    ours(input_ids=ids, labels=ids).loss.backward()
    restore_parked(ours)
    assert ours.lm_head.weight.is_cuda and torch.equal(ours.lm_head.weight, ref.lm_head.weight)
