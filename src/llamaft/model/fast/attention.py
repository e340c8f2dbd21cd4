"""Attention for packed (padding-free) rows, plugged into transformers through `AttentionInterface`.

Kernels, all taking q [T, Hq, D], k/v [T, Hkv, D] (one packed row, GQA allowed) and int32
`cu_seqlens` [N+1], causal inside each example and never across examples:
  * `packed_attention_reference` - the plain reference: a loop of per-example SDPA calls;
  * `packed_attention_varlen`    - torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside
                                   PyTorch >= 2.10, CUDA sm80+); its keyword set changed between
                                   releases, so it is read from the signature at run time;
  * `packed_attention_flex`      - FlexAttention with a document-causal BlockMask (fallback);
  * `single_attention_sdpa`      - a row holding ONE example (long context, micro-batch 1): plain
                                   causal SDPA, which on an H100 runs cuDNN's attention: 7.2 s vs
                                   12.2 s per 32k-token QLoRA step with varlen's FA2
                                   (benchmarks/results, maxlen_attn_32k); `fast.single_sequence_sdpa`.

`install_attention(model, name)` registers `llamaft_varlen` / `llamaft_flex` / `llamaft_ref` and
switches the model to it. The HF-facing function reads `cu_seq_lens_q` and `max_length_q` (what
data.pack.PackedCollator emits), or derives them from packed `position_ids`; with neither (an
ordinary padded batch) it falls back to HF's SDPA, so the installed model still trains on any batch.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from ..adapters import base_model

_NAMES = {"varlen": "llamaft_varlen", "flex": "llamaft_flex", "reference": "llamaft_ref",
          "varlen_only": "llamaft_varlen_only"}  # varlen without the one-example SDPA shortcut


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # [T, Hkv, D] -> [T, Hkv * n_rep, D] with query head h reading kv head h // n_rep (HF repeat_kv order)
    if n_rep == 1:
        return x
    t, h, d = x.shape
    return x[:, :, None, :].expand(t, h, n_rep, d).reshape(t, h * n_rep, d)


def packed_attention_reference(q, k, v, cu_seqlens, scale=None):
    """Plain PyTorch reference: causal SDPA per example, concatenated. Slow, obviously right."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available() -> bool:
    try:
        _varlen_params()
    except (ImportError, AttributeError):  # torch < 2.10 has no varlen_attn (pyproject allows >= 2.4)
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def packed_attention_varlen(q, k, v, cu_seqlens, max_len: int, scale=None):
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kw = {}
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-9:
        raise ValueError("this torch's varlen_attn has no `scale`; only 1/sqrt(head_dim) is supported")
    if "is_causal" in params:  # torch 2.10
        kw["is_causal"] = True
    else:  # torch >= 2.11: causal = window (-1, 0)
        kw["window_size"] = (-1, 0)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kw)


def single_attention_sdpa(q, k, v, scale=None):
    """One causal example: SDPA preferring cuDNN, then FlashAttention, then memory-efficient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, T, D]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


# ---- FlexAttention: a document-causal block mask, built once per batch and reused by every layer
_block_cache: dict = {}


def _document_block_mask(cu_seqlens: torch.Tensor, total: int):
    from torch.nn.attention.flex_attention import create_block_mask

    key = (cu_seqlens.data_ptr(), total, cu_seqlens.shape[0])
    hit = _block_cache.get(key)
    if hit is not None and torch.equal(hit[0], cu_seqlens):
        return hit[1]
    doc = torch.zeros(total, dtype=torch.int32, device=cu_seqlens.device)
    doc[cu_seqlens[1:-1].long()] = 1
    doc = doc.cumsum(0)

    def doc_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    mask = create_block_mask(doc_causal, None, None, total, total, device=cu_seqlens.device)
    _block_cache.clear()  # one batch at a time: layers of the same forward share it
    _block_cache[key] = (cu_seqlens.clone(), mask)
    return mask


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def packed_attention_flex(q, k, v, cu_seqlens, scale=None):
    mask = _document_block_mask(cu_seqlens, q.shape[0])
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, T, D]
    out = _compiled_flex()(qb, kb, vb, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def best_packed_attention() -> str | None:
    if varlen_available():
        return "varlen"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5 has no FlexAttention (pyproject allows >= 2.4)
        return None
    return "flex" if torch.cuda.is_available() else None


# ---- the transformers-facing function
def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[1, T] positions restarting at 0 per example -> (int32 cu_seqlens [N+1], max length)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0, as_tuple=False).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _packed_info(query, kwargs):
    """(cu_seqlens, max_len) over the flattened [B * S] tokens, from the collator's kwargs or from
    position_ids (a restart at 0 opens a new example; every row starts one)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and query.shape[0] == 1:
        mx = kwargs.get("max_length_q")
        mx = int(mx) if mx is not None else int((cu[1:] - cu[:-1]).max())
        return cu.to(device=query.device, dtype=torch.int32), mx
    b, s = query.shape[0], query.shape[2]
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(s, device=query.device).unsqueeze(0)
    return cu_seqlens_from_position_ids(pos.to(query.device).expand(b, s))


def _compute_dtype() -> torch.dtype:
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _make_hf_attention(kernel: str, single_sdpa: bool = False):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, Hq, S, D]; key/value [B, Hkv, S, D]; returns ([B, S, Hq, D], None) like HF's sdpa
        if attention_mask is not None or query.shape[2] != key.shape[2]:
            # a padded batch (our mask function only builds a mask when there is padding) or a KV cache
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        b, s = query.shape[0], query.shape[2]
        cu, mx = _packed_info(query, kwargs)
        q, k, v = (x.transpose(1, 2).reshape(b * s, x.shape[1], x.shape[3]) for x in (query, key, value))
        if kernel == "varlen":
            in_dtype = q.dtype
            if in_dtype == torch.float32:
                # fp32 q/k/v (an fp32 model under autocast, or norms upcast by peft's
                # prepare_model_for_kbit_training): the flash kernel rejects fp32. Run it in the
                # compute dtype, as HF's flash path does.
                q, k, v = (x.to(_compute_dtype()) for x in (q, k, v))
            if single_sdpa and cu.shape[0] == 2:  # one example: the shape is known on the host, no sync
                out = single_attention_sdpa(q, k, v, scale=scaling).to(in_dtype)
            else:
                out = packed_attention_varlen(q, k, v, cu, mx, scale=scaling).to(in_dtype)
        elif kernel == "flex":
            out = packed_attention_flex(q, k, v, cu, scale=scaling)
        else:
            out = packed_attention_reference(q, k, v, cu, scale=scaling)
        return out.reshape(b, s, out.shape[1], out.shape[2]), None

    attention.__name__ = f"llamaft_{kernel}_attention"
    return attention


def _padding_only_mask(*args, attention_mask=None, **kwargs):
    # No padding -> no mask at all: our kernels take example boundaries from cu_seqlens, and HF's
    # default would build a [T, T] block-diagonal mask for packed rows (16 GiB at 128k tokens).
    if attention_mask is None or bool(attention_mask.all()):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_all() -> None:
    """Register our names with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for kernel, name in _NAMES.items():
        if kernel == "varlen_only":
            AttentionInterface.register(name, _make_hf_attention("varlen"))
        else:
            AttentionInterface.register(name, _make_hf_attention(kernel, single_sdpa=kernel == "varlen"))
        AttentionMaskInterface.register(name, _padding_only_mask)


def install_attention(model, attention: str, single_sdpa: bool = True) -> str:
    """Switch a HF model (PEFT-wrapped or not) to `attention` ('varlen'|'flex'|'reference'|'sdpa'|'eager').
    single_sdpa=False keeps varlen's kernel for rows holding one example too."""
    if attention == "varlen" and not single_sdpa:
        attention = "varlen_only"
    name = _NAMES.get(attention, attention)
    if name.startswith("llamaft_"):
        register_all()
    base = base_model(model)
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(name)
    else:
        base.config._attn_implementation = name
    return name
