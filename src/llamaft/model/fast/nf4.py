"""NF4 dequantisation in one pass, double-quantised absmax included (QLoRA's frozen base weights).

bitsandbytes dequantises a double-quantised ("nested") NF4 weight in three kernels: the 8-bit
absmax codes -> fp32 (blockwise, 256 per block), `+= offset`, then the 4-bit values x absmax -> bf16.
QLoRA with checkpointing does this for every projection three times per micro-batch (forward,
recompute, backward): 672 calls per micro-batch on an 8B model, each also paying bitsandbytes'
Python dispatch. `dequantize_nf4` does all of it in one Triton kernel (each program expands 1,024
packed bytes: both nibbles, their 64-value block's absmax from its 8-bit code and the 256-block
second-level scale).

`reference_dequantize_nf4` is the same arithmetic in plain PyTorch (the CPU fallback and the parity
reference); the GPU tests also compare both with bitsandbytes' own `dequantize_4bit`.
Layout (bitsandbytes): bytes hold two values, high nibble first; value = code[nibble] * absmax[i // 64];
nested absmax[j] = code2[absmax_u8[j]] * absmax2[j // 256] + offset, all in fp32.
"""

from __future__ import annotations

import torch

try:  # triton ships with CUDA builds of torch; CPU installs fall back to the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_BYTES = 1024  # packed bytes per Triton program (2,048 outputs, 32 quantisation blocks of 64)


def reference_dequantize_nf4(packed, code, absmax, blocksize, shape, dtype=torch.bfloat16,
                             absmax2=None, code2=None, offset=None, blocksize2=256):
    """Plain PyTorch: the arithmetic of bitsandbytes' dequantize_4bit (nested when absmax2 is given)."""
    if absmax2 is not None:
        idx = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        absmax = code2[absmax.long()] * absmax2[idx] + offset
    b = packed.reshape(-1)
    nib = torch.stack([b >> 4, b & 15], dim=1).reshape(-1).long()  # high nibble first
    n = shape[0] * shape[1]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (code.float()[nib[:n]] * scale).to(dtype).reshape(shape)


if triton is not None:
    @triton.jit
    def _nf4_kernel(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                    n_bytes, BYTES: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK2: tl.constexpr,
                    NESTED: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
        mask = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 15))
        blk = offs // HALF_BLOCK  # quantisation block of both nibbles (blocksize / 2 bytes each)
        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + blk // BLOCK2, mask=mask, other=0.0) \
                + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        vals = tl.join(hi * scale, lo * scale)  # [BYTES, 2]: element 2i is the high nibble
        outs = 2 * offs[:, None] + tl.arange(0, 2)[None, :]
        tl.store(out_ptr + outs, vals.to(out_ptr.dtype.element_ty), mask=mask[:, None])


def triton_available() -> bool:
    return triton is not None and torch.cuda.is_available()


def _launch(packed, code, absmax, absmax2, code2, offset, blocksize, blocksize2, rows, cols, nested, dtype, run):
    # called inside the opaque `llamaft::nf4_lora` ops (model/fast/lora_nf4.py), never traced
    out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    n_bytes = rows * cols // 2
    run(_nf4_kernel)[(triton.cdiv(n_bytes, _BYTES),)](
        packed, code, absmax, absmax2, code2, offset, out, n_bytes,
        BYTES=_BYTES, HALF_BLOCK=blocksize // 2, BLOCK2=blocksize2, NESTED=nested)
    return out


def dequantize_nf4(packed, code, absmax, blocksize, shape, dtype=torch.bfloat16,
                   absmax2=None, code2=None, offset=None, blocksize2=256):
    """[N, K] weight in `dtype` from bitsandbytes' packed NF4; one Triton kernel on CUDA."""
    rows, cols = int(shape[0]), int(shape[1])
    if not (packed.is_cuda and triton is not None) or blocksize % 2 or (rows * cols) % 2:
        return reference_dequantize_nf4(packed, code, absmax, blocksize, shape, dtype, absmax2, code2, offset, blocksize2)
    nested = absmax2 is not None
    if nested and not torch.is_tensor(offset):
        offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
    args = (packed, code, absmax, absmax2 if nested else absmax, code2 if nested else code,
            offset if nested else absmax, blocksize, blocksize2, rows, cols, nested, dtype)
    return _launch(*args, run=lambda k: k)


def dequantize_state(weight, state, dtype=torch.bfloat16, kernel=dequantize_nf4):
    """Dequantise a bitsandbytes Params4bit (`weight`, its `quant_state`) with `kernel` (NF4 only)."""
    nested = getattr(state, "nested", False)
    return kernel(weight, state.code, state.absmax, state.blocksize, tuple(state.shape), dtype,
                  state.state2.absmax if nested else None, state.state2.code if nested else None,
                  state.offset if nested else None, state.state2.blocksize if nested else 256)


def supported(layer) -> bool:
    """A bitsandbytes Linear4bit whose weight our kernel can expand (NF4, bias-free, 2-D [out, in])."""
    w = getattr(layer, "weight", None)
    state = getattr(w, "quant_state", None)
    if state is None or getattr(layer, "bias", None) is not None:
        return False
    return state.quant_type == "nf4" and len(state.shape) == 2 and state.blocksize % 2 == 0
