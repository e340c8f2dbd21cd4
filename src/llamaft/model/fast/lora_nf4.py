"""QLoRA projection as two opaque ops: y = x dequant(Q)^T + s (x A^T) B^T, and its backward.

Why opaque custom ops (torch.library) rather than an autograd.Function traced by torch.compile:
  * memory: traced, the forward's and the backward's dequantisation of the same weight are one
    expression to AOTAutograd, which then SAVES the bf16 weight between them. On QLoRA-8B with every
    layer recomputed that kept ~0.4-0.8 GiB of dequantised weights alive at the backward's peak
    (benchmarks/memory_peak.py). Here the weight never leaves the op: rebuilt in the backward;
  * correctness: the traced autograd.Function version returned zero input gradients under
    torch.compile on CUDA (torch 2.11; tests/model/fast/test_gpu.py caught it);
  * fewer launches than bitsandbytes' Linear4bit + PEFT: one dequant kernel (model/fast/nf4.py,
    absmax double-quant included), the base GEMM, and the LoRA GEMMs accumulating into its output.

The quant state travels as tensors + ints (custom ops take nothing else). Reference: PEFT's forward
over bitsandbytes' own Linear4bit (GPU test), and dense PyTorch on the reference dequant (CPU test).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .nf4 import dequantize_nf4


def _weight(packed, code, absmax, absmax2, code2, offset, blocksize, blocksize2, rows, cols, nested, dtype):
    return dequantize_nf4(packed, code, absmax, blocksize, (rows, cols), dtype, absmax2 if nested else None,
                          code2 if nested else None, offset if nested else None, blocksize2)


@torch.library.custom_op("llamaft::nf4_lora", mutates_args=())
def _fwd(x: Tensor, packed: Tensor, code: Tensor, absmax: Tensor, absmax2: Tensor, code2: Tensor, offset: Tensor,
         a: Tensor, b: Tensor, scale: float, blocksize: int, blocksize2: int, rows: int, cols: int,
         nested: bool) -> tuple[Tensor, Tensor]:
    w = _weight(packed, code, absmax, absmax2, code2, offset, blocksize, blocksize2, rows, cols, nested, x.dtype)
    xa = x @ a.t()
    y = x @ w.t()
    y.addmm_(xa, b.t(), alpha=scale)
    return y, xa


@_fwd.register_fake
def _(x, packed, code, absmax, absmax2, code2, offset, a, b, scale, blocksize, blocksize2, rows, cols, nested):
    return x.new_empty((x.shape[0], rows)), x.new_empty((x.shape[0], a.shape[0]))


@torch.library.custom_op("llamaft::nf4_lora_backward", mutates_args=())
def _bwd(g: Tensor, x: Tensor, xa: Tensor, packed: Tensor, code: Tensor, absmax: Tensor, absmax2: Tensor,
         code2: Tensor, offset: Tensor, a: Tensor, b: Tensor, scale: float, blocksize: int, blocksize2: int,
         rows: int, cols: int, nested: bool, need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    gb = (g @ b).mul_(scale)  # [N, r]
    if need_dx:
        dx = g @ _weight(packed, code, absmax, absmax2, code2, offset, blocksize, blocksize2, rows, cols, nested, g.dtype)
        dx.addmm_(gb, a)
    else:
        dx = g.new_empty((0,))
    return dx, gb.t() @ x, (g.t() @ xa).mul_(scale)


@_bwd.register_fake
def _(g, x, xa, packed, code, absmax, absmax2, code2, offset, a, b, scale, blocksize, blocksize2, rows, cols,
      nested, need_dx):
    dx = g.new_empty((g.shape[0], cols)) if need_dx else g.new_empty((0,))
    return dx, g.new_empty((a.shape[0], cols)), g.new_empty((rows, a.shape[0]))


def _setup(ctx, inputs, output):
    x, packed, code, absmax, absmax2, code2, offset, a, b = inputs[:9]
    ctx.save_for_backward(x, output[1], packed, code, absmax, absmax2, code2, offset, a, b)
    ctx.meta = inputs[9:]
    ctx.need_dx = x.requires_grad


def _backward(ctx, gy, _gxa):
    x, xa, packed, code, absmax, absmax2, code2, offset, a, b = ctx.saved_tensors
    dx, da, db = _bwd(gy.contiguous(), x, xa, packed, code, absmax, absmax2, code2, offset, a, b, *ctx.meta,
                      ctx.need_dx)
    return (dx if ctx.need_dx else None, None, None, None, None, None, None, da, db) + (None,) * len(ctx.meta)


torch.library.register_autograd("llamaft::nf4_lora", _backward, setup_context=_setup)


def lora_4bit(x, packed, a, b, scale: float, state, dtype=torch.bfloat16):
    """PEFT LoRA over a bitsandbytes NF4 weight (`packed`, its `state`), computed in `dtype`."""
    nested = bool(getattr(state, "nested", False))
    s2 = state.state2 if nested else None
    absmax = state.absmax
    offset = state.offset if nested else absmax
    if nested and not torch.is_tensor(offset):
        offset = torch.tensor(float(offset), dtype=torch.float32, device=absmax.device)
    rows, cols = int(state.shape[0]), int(state.shape[1])
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dtype)
    y, _ = _fwd(x2, packed, state.code, absmax, s2.absmax if nested else absmax, s2.code if nested else state.code,
                offset, a.to(dtype), b.to(dtype), float(scale), int(state.blocksize),
                int(s2.blocksize) if nested else 256, rows, cols, nested)
    return y.reshape(*shape[:-1], rows).to(x.dtype)
