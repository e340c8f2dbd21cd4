"""Fused linear + cross-entropy: the causal-LM loss without the [T, 128256] logits tensor.

`chunked_linear_cross_entropy(h, W, targets, denom)` computes sum(CE(h @ W.T, targets)) / denom in
chunks of rows. The gradients are computed inside the forward, chunk by chunk (as Liger's FLCE does),
so neither pass ever holds more than one chunk of logits: peak extra memory is about
chunk x vocab x 6 bytes (~0.8 GiB at 1046 x 128256) instead of T x vocab x 10 bytes (bf16 logits +
fp32 upcast + fp32 grad), and no logits are kept for the backward. Rows whose target is -100 are
skipped entirely (completion-only training spends no vocab matmul on prompt tokens).

Numerics follow HF's path (lm_head in bf16 -> upcast to fp32 -> CE); the reference is
`reference_causal_lm_loss` = plain lm_head + HF's ForCausalLMLoss arithmetic.

`install_fused_loss(model)` replaces the forward of the (PEFT-wrapped or plain) HF causal LM on
that instance only: with labels it runs the decoder, then this loss, and returns logits=None;
without labels it is the original forward (generation untouched). It accepts `num_items_in_batch`
like HF's loss, so the Trainer's gradient-accumulation normalisation is identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...data.chat import IGNORE_INDEX
from ..adapters import base_model


def _chunk_rows(vocab: int) -> int:
    # ~2^27 fp32 logits per chunk (512 MiB; ~1046 rows at 128k vocab): the GEMM still fills an H100
    return max(256, (1 << 27) // vocab)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, denom, chunk):
        # h [N, H] (bf16), weight [V, H], targets [N] long, denom: float or 0-dim tensor
        valid = torch.nonzero(targets != IGNORE_INDEX, as_tuple=False).reshape(-1)
        grad_h = torch.zeros_like(h)
        need_w = weight.requires_grad
        # full fine-tuning trains the lm_head: its gradient accumulates chunk by chunk in the weight's
        # dtype through the GEMM's own epilogue (beta=1), one rounding per chunk and no [V, H]
        # temporaries (an fp32 buffer + upcast copies were ~5 GiB on 8B at the forward's peak)
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        scale = 1.0 / denom if not torch.is_tensor(denom) else 1.0 / denom.to(h.device, torch.float32)
        for start in range(0, valid.numel(), chunk):
            rows = valid[start:start + chunk]
            # In the weight's dtype: QLoRA hands fp32 hidden states (fp32 norms) to a bf16 lm_head.
            hc, tc = h.index_select(0, rows).to(weight.dtype), targets.index_select(0, rows)
            logits = (hc @ weight.t()).float()  # bf16 matmul, fp32 softmax: as HF's lm_head + loss
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            # d(CE)/d(logits) = softmax - onehot, built in place over the logits buffer
            logits.sub_(lse[:, None]).exp_()
            logits.scatter_add_(1, tc[:, None], torch.full_like(lse[:, None], -1.0))
            g = logits.mul_(scale).to(weight.dtype)  # in place: one fp32 chunk buffer at a time
            del logits
            grad_h.index_copy_(0, rows, (g @ weight).to(grad_h.dtype))
            if need_w:
                grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.need_w = need_w
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        # in place: a second [V, H] buffer at the start of the backward is what the budget cannot spare
        # (this graph is backpropagated once, as a training loss is)
        gw = grad_w.mul_(grad_out.to(grad_w.dtype)) if ctx.need_w else None
        return gh, gw, None, None, None


def chunked_linear_cross_entropy(h, weight, targets, denom=None, chunk: int | None = None):
    """sum over rows with target != -100 of CE(h @ weight.T, target), divided by `denom`
    (default: the number of such rows, i.e. the mean)."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1).to(h.device)
    if denom is None:
        denom = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return _ChunkedLinearCE.apply(h, weight, targets, denom, chunk or _chunk_rows(weight.shape[0]))


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """HF's causal shift: position t predicts labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def fused_causal_lm_loss(hidden, weight, labels, num_items_in_batch=None, chunk: int | None = None):
    return chunked_linear_cross_entropy(hidden, weight, shift_targets(labels), denom=num_items_in_batch, chunk=chunk)


def reference_causal_lm_loss(hidden, weight, labels, num_items_in_batch=None):
    """Plain reference: full logits, then HF's ForCausalLMLoss arithmetic."""
    logits = (hidden @ weight.t()).float()
    targets = shift_targets(labels).reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return loss / denom


def fusable(lm) -> bool:
    """A causal LM this loss can take over: a `model` decoder and a plain bias-free nn.Linear lm_head
    (not LoRA- or 4-bit-wrapped). `lm`: the model under any PEFT wrapper."""
    head = getattr(lm, "lm_head", None)
    return getattr(lm, "model", None) is not None and type(head) is torch.nn.Linear and head.bias is None


def install_fused_loss(model, chunk: int | None = None, park_head: bool = False) -> bool:
    """Patch the causal LM's forward (this instance only). Returns False (and changes nothing) when the
    model has no plain `model` + bias-free `lm_head` layout, so callers can record the fallback.
    `chunk`: rows of logits per chunk (default ~512 MiB of fp32 logits; QLoRA's plan asks for fewer).
    `park_head`: a frozen lm_head waits in CPU memory between losses (model/fast/head.py); see
    `lm._llamaft_parked_head` (None when not eligible)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    lm = base_model(model)
    if not fusable(lm):
        return False
    decoder = lm.model
    if getattr(lm, "_llamaft_fused_loss", False):
        return True
    original = lm.forward
    parked = None
    if park_head:
        from .head import park_lm_head

        parked = park_lm_head(lm, getattr(decoder, "layers", None))
    lm._llamaft_parked_head = parked

    # the KV cache rides in kwargs under this transformers' name (`past_key_values`, `cache` from 5.24, where
    # passing `past_key_values` at all is deprecated: removed in 5.40)
    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if labels is None:
            if parked is not None:
                parked.acquire()  # evaluation / generation: the head stays on the GPU from here
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        head = parked.acquire() if parked is not None else lm.lm_head.weight
        loss = fused_causal_lm_loss(out.last_hidden_state, head, labels, num_items, chunk)
        if parked is not None and torch.is_grad_enabled():
            parked.release()  # the backward never reads it (gradients were computed above)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values)

    lm.forward = forward
    lm._llamaft_fused_loss = True
    return True
