"""GPU fast path for training (issue 5): packing, varlen attention, fused loss, checkpointing choice.

What `llamaft.train` calls, in this order:

    plan = choose_plan(cfg, model)          # decide (pure: reads cfg, the model's size and the device)
    model = apply_fast_path(model, plan)    # install: attention kernel, fused loss, checkpointing, compile
    collate = make_collator(plan, pad_id)   # padding-free packed rows, or right padding (data.collate)

Every part has a plain reference beside it (attention: per-sequence SDPA; loss: lm_head +
F.cross_entropy) and a parity test. On CPU, or with `fast.enabled: false`, the plan is all off and
the model is the plain HF model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["FastPlan", "choose_plan", "apply_fast_path", "make_collator"]


@dataclass
class FastPlan:
    packing: bool                 # padding-free rows (data.pack.PackedCollator) + varlen/flex attention
    attention: str                # "varlen" | "flex" | "reference" | "sdpa" | "eager": what install_attention sets
    fused_loss: bool              # chunked lm_head + cross-entropy, full logits never materialised
    gradient_checkpointing: bool  # recompute activations (only when the estimate says memory is short)
    compile: bool                 # torch.compile of decoder blocks
    reasons: list[str] = field(default_factory=list)  # one line per decision, logged by train/
    fused_lora: bool = False      # PEFT LoRA linears as 3-GEMM autograd functions (model/fast/lora.py)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda_target(model) -> bool:
    dev = _model_device(model) if model is not None else None
    if dev is not None and dev.type == "meta":  # not placed yet: decide for where it will go
        dev = None
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda")


def choose_plan(cfg, model=None) -> FastPlan:
    """Decide each part of the fast path from the config (explicit on/off wins) and the hardware."""
    from .attention import best_packed_attention
    from .memory import needs_checkpointing

    f, reasons = cfg.fast, []
    gc_cfg = cfg.train.gradient_checkpointing
    cuda = _cuda_target(model)
    if not f.enabled or not cuda:
        why = "fast.enabled=false" if not f.enabled else "no CUDA device"
        reasons.append(f"fast path off ({why}): plain HF model, SDPA attention, right padding")
        packing = cfg.data.packing == "on"  # an explicit request still works: HF SDPA reads packed position_ids
        if packing:
            reasons.append("packing on (data.packing=on): per-example reference attention (correct, not fast)")
            # HF's SDPA does not isolate packed examples by itself: use our per-example reference kernel
            attention = "reference" if f.attention in ("auto", "sdpa") else f.attention
        else:
            attention = "sdpa" if f.attention == "auto" else f.attention
        gc = gc_cfg == "on"
        reasons.append(f"gradient checkpointing {'on' if gc else 'off'} (train.gradient_checkpointing={gc_cfg})")
        return FastPlan(packing, attention, False, gc, False, reasons)

    # attention + packing go together: packed rows need a kernel that respects document boundaries
    packed_kernel = best_packed_attention()  # "varlen" on torch >= 2.10 + sm80, else "flex", else None
    attention = f.attention
    if attention == "auto":
        attention = packed_kernel or "sdpa"
        reasons.append(f"attention {attention} (auto: best packed kernel on this torch/GPU)")
    else:
        reasons.append(f"attention {attention} (fast.attention)")
    if cfg.data.packing == "off":
        packing = False
        reasons.append("packing off (data.packing=off)")
    elif cfg.data.packing == "on" or attention in ("varlen", "flex"):
        packing = True
        reasons.append(f"packing on ({'data.packing=on' if cfg.data.packing == 'on' else 'auto'}): no pad tokens computed")
    else:
        packing = False
        reasons.append(f"packing off (auto: attention {attention} has no varlen path here)")

    fused = f.fused_loss != "off"
    reasons.append(f"fused loss {'on' if fused else 'off'} (fast.fused_loss={f.fused_loss})")

    if gc_cfg == "auto":
        gc, why = needs_checkpointing(cfg, model)
        reasons.append(f"gradient checkpointing {'on' if gc else 'off'} (auto: {why})")
    else:
        gc = gc_cfg == "on"
        reasons.append(f"gradient checkpointing {gc_cfg} (train.gradient_checkpointing)")

    # compile: measured +8% on W512 LoRA without checkpointing (benchmarks/README.md) for ~90 s of
    # compilation; auto turns it on only there (QLoRA / full / checkpointed blocks were not measured)
    if f.compile == "auto":
        comp = cfg.model.method == "lora" and not gc
        reasons.append(f"torch.compile {'on' if comp else 'off'} (auto: {'lora without checkpointing' if comp else 'only measured to win for lora without checkpointing'})")
    else:
        comp = f.compile == "on"
        reasons.append(f"torch.compile {comp and 'on' or 'off'} (fast.compile={f.compile})")
    reasons.append("fused LoRA linears on (fast path): scale and add inside the GEMMs")
    return FastPlan(packing, attention, fused, gc, comp, reasons, fused_lora=True)


def apply_fast_path(model, plan: FastPlan):
    """Install the plan on a (PEFT-wrapped or plain) HF causal LM; returns the same model object."""
    from .attention import install_attention
    from .loss import install_fused_loss

    install_attention(model, plan.attention)
    if plan.fused_loss and not install_fused_loss(model):
        plan.fused_loss = False
        plan.reasons.append("fused loss off: lm_head is not a plain bias-free nn.Linear")
    if plan.fused_lora:
        from .lora import fuse_lora

        fuse_lora(model)  # call after the adapters are attached; PEFT-free models are left as they are
    if plan.gradient_checkpointing:
        _enable_checkpointing(model)
    if plan.compile:
        from .compile import compile_blocks

        compile_blocks(model)
    return model


def _enable_checkpointing(model) -> None:
    # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads tricks
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


def make_collator(plan: FastPlan, pad_id: int) -> Callable[[list[dict]], dict[str, Any]]:
    """Batches for the Trainer: packed single rows when plan.packing, else right padding."""
    if plan.packing:
        from llamaft.data.pack import PackedCollator

        return PackedCollator()
    from llamaft.data.collate import Collator  # lazy: owned by the training engineer

    return Collator(pad_id)
