"""GPU parity tests of the fast kernels against their plain references (fresh random inputs,
forward and backward). Run on the device: pytest -m gpu tests/test_fast_gpu.py"""

import pytest
import torch

from llamaft.model.fast.attention import (
    best_packed_attention, packed_attention_flex, packed_attention_reference, packed_attention_varlen,
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
    """QLoRA keeps norms in fp32 (prepare_model_for_kbit_training), so q/k/v reach attention in fp32;
    the varlen path must run them in bf16 and give back fp32, matching the fp32 reference."""
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
