"""Fused LoRA linear: y = x W^T + s (x A^T) B^T in 3 GEMMs forward and 5 backward, no elementwise ops.

PEFT's LoRA forward is `base(x) + lora_B(lora_A(dropout(x))) * scaling`: on an 8B model at W512
the extra casts, the scaling multiply and the add (each a full [T, out] pass, forward and backward)
cost ~15% of the step (benchmarks/results/profile_w512_lora.json). Here the scale and the add ride
in cuBLAS's epilogue (`addmm_` with alpha, beta=1) and the backward adds the low-rank input gradient
in place into the base one.

Adapter weights stay fp32 masters (PEFT's default); they are cast to the activation dtype per call
(16 x 4096 elements: free), and their gradients come back in fp32 as autograd expects.

`fuse_lora(model)` patches every eligible PEFT `lora.Linear` forward (one active adapter, no dropout,
no DoRA / variants, not merged; also PEFT's bitsandbytes Linear4bit class): a plain nn.Linear base
-> full fusion, a bnb NF4 base -> `lora_4bit` (model/fast/lora_nf4.py), any other base -> the
low-rank half only. At call time any other state (adapters disabled, merged, several adapters)
falls back to PEFT's own forward. Reference: PEFT's forward itself (tests compare both).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lora_nf4 import lora_4bit

_fwd = torch.amp.custom_fwd(device_type="cuda")
_bwd = torch.amp.custom_bwd(device_type="cuda")


# Frozen dense base weight W: y = x W^T + s (x A^T) B^T, as two opaque custom ops (like lora_nf4.py).
# Traced by torch.compile, an autograd.Function's in-place `addmm_` is functionalised into an
# out-of-place addmm, which copies the [T, out] base output before the GEMM accumulates into it:
# 14 device-to-device copies per layer (7 projections, forward and backward), 22 ms of a 582 ms W512
# LoRA step on the H200 (benchmarks/results/budget_h200/profile_*.json). Opaque, the GEMMs accumulate
# in place. x, a and b arrive in the compute dtype (the casts stay outside, so autograd returns the
# adapters' gradients in their own fp32).
@torch.library.custom_op("llamaft::lora_linear", mutates_args=())
def _dense_fwd(x: Tensor, weight: Tensor, a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    xa = x @ a.t()
    y = x @ weight.to(x.dtype).t()
    y.addmm_(xa, b.t(), alpha=scale)
    return y, xa


@_dense_fwd.register_fake
def _(x, weight, a, b, scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], a.shape[0]))


@torch.library.custom_op("llamaft::lora_linear_backward", mutates_args=())
def _dense_bwd(g: Tensor, x: Tensor, xa: Tensor, weight: Tensor, a: Tensor, b: Tensor, scale: float,
               need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    gb = (g @ b).mul_(scale)  # [N, r]
    if need_dx:
        dx = g @ weight.to(g.dtype)
        dx.addmm_(gb, a)
    else:
        dx = g.new_empty((0,))
    return dx, gb.t() @ x, (g.t() @ xa).mul_(scale)


@_dense_bwd.register_fake
def _(g, x, xa, weight, a, b, scale, need_dx):
    dx = g.new_empty((g.shape[0], x.shape[1])) if need_dx else g.new_empty((0,))
    return dx, g.new_empty((a.shape[0], x.shape[1])), g.new_empty((b.shape[0], a.shape[0]))


def _dense_setup(ctx, inputs, output):
    x, weight, a, b, scale = inputs
    ctx.save_for_backward(x, output[1], weight, a, b)
    ctx.scale, ctx.need_dx = scale, x.requires_grad


def _dense_backward(ctx, gy, _gxa):
    x, xa, weight, a, b = ctx.saved_tensors
    dx, da, db = _dense_bwd(gy.contiguous(), x, xa, weight, a, b, ctx.scale, ctx.need_dx)
    return (dx if ctx.need_dx else None), None, da, db, None


torch.library.register_autograd("llamaft::lora_linear", _dense_backward, setup_context=_dense_setup)


class _LoraDelta(torch.autograd.Function):
    """Any base (e.g. bnb 4-bit): returns base_out + s (x A^T) B^T; base_out's own graph is untouched."""

    @staticmethod
    @_fwd
    def forward(ctx, base_out, x, a, b, scale):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(base_out.dtype)
        ac, bc = a.to(base_out.dtype), b.to(base_out.dtype)
        xa = x2 @ ac.t()
        y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), xa, bc.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, ac, bc)
        ctx.scale, ctx.shape, ctx.x_dtype = scale, shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        return y.reshape(base_out.shape)

    @staticmethod
    @_bwd
    def backward(ctx, g):
        x2, xa, ac, bc = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(x2.dtype)
        gb = (g2 @ bc).mul_(ctx.scale)
        dx = (gb @ ac).reshape(ctx.shape).to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        da = (gb.t() @ x2).to(ctx.a_dtype) if ctx.needs_input_grad[2] else None
        db = (g2.t() @ xa).mul_(ctx.scale).to(ctx.b_dtype) if ctx.needs_input_grad[3] else None
        return g, dx, da, db, None


def lora_linear(x, weight, a, b, scale: float):
    """PEFT LoRA over a frozen dense `weight`, computed in x's dtype (autocast's, under autocast)."""
    dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    shape = x.shape
    y, _ = _dense_fwd(x.reshape(-1, shape[-1]).to(dtype), weight, a.to(dtype), b.to(dtype), float(scale))
    return y.reshape(*shape[:-1], weight.shape[0])


def lora_delta(base_out, x, a, b, scale: float):
    return _LoraDelta.apply(base_out, x, a, b, scale)


def _eligible(layer) -> bool:
    names = list(layer.lora_A.keys())
    if len(names) != 1 or getattr(layer, "lora_variant", {}).get(names[0]) is not None:
        return False
    if getattr(layer, "use_dora", {}).get(names[0], False):
        return False
    return isinstance(layer.lora_dropout[names[0]], torch.nn.Identity)


def _nf4_base(base) -> bool:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # optional (llamaft[gpu]): no 4-bit bases without it
        return False
    from .nf4 import supported

    return isinstance(base, Linear4bit) and supported(base)


def fuse_lora(model, nf4: bool = True) -> int:
    """Patch eligible PEFT LoRA linears in place; returns how many were patched. `nf4`: bitsandbytes
    NF4 bases run as `lora_4bit` (our dequant kernel) instead of their own forward + `lora_delta`."""
    from peft.tuners.lora import Linear as LoraLinear

    kinds: tuple = (LoraLinear,)
    try:  # PEFT's own LoRA class for bitsandbytes 4-bit bases (what a QLoRA model gets): not a Linear
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        kinds += (LoraLinear4bit,)
    except ImportError:  # bitsandbytes is optional (llamaft[gpu]): PEFT then defines no such class
        pass
    count = 0
    for layer in model.modules():
        if not isinstance(layer, kinds) or getattr(layer, "_llamaft_fused", False) or not _eligible(layer):
            continue
        name = next(iter(layer.lora_A.keys()))
        dense = type(layer.base_layer) is torch.nn.Linear and layer.base_layer.bias is None
        four = nf4 and _nf4_base(layer.base_layer)
        original = layer.forward

        def forward(x, *args, _layer=layer, _name=name, _dense=dense, _four=four, _orig=original, **kwargs):
            if (args or kwargs or _layer.disable_adapters or _layer.merged
                    or list(_layer.active_adapters) != [_name]):
                return _orig(x, *args, **kwargs)
            a, b = _layer.lora_A[_name].weight, _layer.lora_B[_name].weight
            s = float(_layer.scaling[_name])
            base = _layer.base_layer
            if _dense and not base.weight.requires_grad:
                return lora_linear(x, base.weight, a, b, s)
            if _four and getattr(base.weight, "quant_state", None) is not None:
                return lora_4bit(x, base.weight, a, b, s, base.weight.quant_state, base.compute_dtype or x.dtype)
            return lora_delta(base(x), x, a, b, s)

        layer.forward = forward
        layer._llamaft_fused = True
        count += 1
    return count
