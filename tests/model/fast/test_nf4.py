"""NF4 dequantisation (model/fast/nf4.py) and the NF4 + LoRA ops (model/fast/lora_nf4.py) on CPU.

The Triton kernel itself is compared with bitsandbytes on the GPU (tests/model/fast/test_gpu.py); here the
plain-PyTorch reference is checked against a per-element reading of bitsandbytes' layout, and
`lora_4bit` (with that reference as its dequant) against dense PyTorch on the same weight.
"""

from types import SimpleNamespace

import torch

from llamaft.model.fast.lora import lora_delta
from llamaft.model.fast.lora_nf4 import lora_4bit
from llamaft.model.fast.nf4 import dequantize_nf4, dequantize_state, reference_dequantize_nf4

NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def _quantize(w, blocksize=64, nested=True, blocksize2=256, seed=0):
    """A small NF4 quantiser in bitsandbytes' layout (nearest code, high nibble first; nested absmax
    as 8-bit codes of a 256-entry table with per-256-block scales and a mean offset)."""
    flat = w.reshape(-1, blocksize)
    absmax = flat.abs().amax(1)
    idx = ((flat / absmax[:, None])[..., None] - NF4).abs().argmin(-1).reshape(-1)
    packed = (idx[0::2] << 4 | idx[1::2]).to(torch.uint8)
    state = SimpleNamespace(code=NF4, absmax=absmax, blocksize=blocksize, shape=w.shape, quant_type="nf4",
                            nested=False, offset=None, state2=None)
    if nested:
        offset = absmax.mean()
        code2 = torch.linspace(-1, 1, 256)
        centred = absmax - offset
        groups = centred.split(blocksize2)
        absmax2 = torch.stack([g.abs().max() for g in groups])
        codes = torch.cat([((g / s)[:, None] - code2).abs().argmin(-1) for g, s in zip(groups, absmax2)])
        state.absmax, state.nested, state.offset = codes.to(torch.uint8), True, offset
        state.state2 = SimpleNamespace(absmax=absmax2, code=code2, blocksize=blocksize2)
    return packed, state


def _by_hand(packed, state, dtype):
    """One element at a time, straight from the layout description."""
    n = state.shape[0] * state.shape[1]
    out = []
    for i in range(n):
        byte = int(packed[i // 2])
        nib = byte >> 4 if i % 2 == 0 else byte & 15
        blk = i // state.blocksize
        if state.nested:
            s2 = state.state2
            a = s2.code[int(state.absmax[blk])] * s2.absmax[blk // s2.blocksize] + state.offset
        else:
            a = state.absmax[blk]
        out.append((NF4[nib] * a).to(dtype))
    return torch.stack(out).reshape(state.shape)


def test_reference_dequant_matches_the_layout_by_hand():
    torch.manual_seed(0)
    for nested, shape in ((True, (6, 256)), (False, (5, 128)), (True, (3, 64 * 3))):
        w = torch.randn(shape)
        packed, state = _quantize(w, nested=nested, blocksize2=4)  # several second-level blocks
        got = dequantize_state(packed, state, torch.bfloat16, kernel=reference_dequantize_nf4)
        assert got.dtype == torch.bfloat16 and got.shape == shape
        assert torch.equal(got, _by_hand(packed, state, torch.bfloat16)), (nested, shape)
        # and it is a dequantisation: within NF4's resolution of the original
        assert (got.float() - w).abs().max() < 0.25 * w.abs().max()


def test_dequantize_nf4_falls_back_to_the_reference_on_cpu():
    w = torch.randn(4, 128)
    packed, state = _quantize(w)
    a = dequantize_state(packed, state)  # default kernel: Triton on CUDA, reference elsewhere
    b = dequantize_state(packed, state, kernel=reference_dequantize_nf4)
    assert torch.equal(a, b)
    assert dequantize_nf4 is not reference_dequantize_nf4


def test_lora_4bit_matches_dense_base_plus_lora_delta():
    torch.manual_seed(1)
    out_f, in_f, r, scale = 96, 128, 8, 0.5
    packed, state = _quantize(torch.randn(out_f, in_f) * 0.1)
    w = dequantize_state(packed, state, torch.float32, kernel=reference_dequantize_nf4)
    a = (torch.randn(r, in_f) * 0.1).requires_grad_()
    b = (torch.randn(out_f, r) * 0.1).requires_grad_()
    x = torch.randn(2, 5, in_f, requires_grad=True)
    g = torch.randn(2, 5, out_f)

    y = lora_4bit(x, packed, a, b, scale, state, torch.float32)
    y.backward(g)
    got = (y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    for t in (x, a, b):
        t.grad = None
    ref = lora_delta(x @ w.t(), x, a, b, scale)
    ref.backward(g)
    for name, u, v in zip(("y", "dx", "da", "db"), got, (ref.detach(), x.grad, a.grad, b.grad)):
        assert u.shape == v.shape and torch.allclose(u, v, atol=1e-5, rtol=1e-4), name


def test_lora_4bit_frozen_input_skips_the_input_gradient():
    packed, state = _quantize(torch.randn(64, 64))
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(64, 4, requires_grad=True)
    y = lora_4bit(torch.randn(3, 64), packed, a, b, 1.0, state, torch.float32)
    y.sum().backward()
    assert a.grad is not None and b.grad is not None


def test_nf4_lora_ops_pass_opcheck_and_compile_on_cpu():
    """The opaque ops' schemas, fake (meta) shapes and autograd registration (torch.library.opcheck),
    and the compiled call equal to the eager one."""
    from llamaft.model.fast import lora_nf4

    torch.manual_seed(2)
    packed, state = _quantize(torch.randn(96, 128) * 0.1)
    s2 = state.state2
    x = torch.randn(10, 128, requires_grad=True)
    a, b = torch.randn(8, 128, requires_grad=True), torch.randn(96, 8, requires_grad=True)
    args = (x, packed, state.code, state.absmax, s2.absmax, s2.code, state.offset, a, b, 0.5, 64, s2.blocksize, 96, 128, True)
    torch.library.opcheck(lora_nf4._fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    g = torch.randn(10, 96)
    eager = lora_4bit(x, packed, a, b, 0.5, state, torch.float32)
    (gx, ga) = torch.autograd.grad(eager, (x, a), g)
    comp = torch.compile(lambda t: lora_4bit(t, packed, a, b, 0.5, state, torch.float32), dynamic=True)(x)
    (cx, ca) = torch.autograd.grad(comp, (x, a), g)
    assert torch.allclose(eager, comp) and torch.allclose(gx, cx) and torch.allclose(ga, ca)
