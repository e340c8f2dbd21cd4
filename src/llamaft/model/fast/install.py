"""Put a FastPlan on a model, and the batches it needs: the plan is read, never changed.

    model = apply_fast_path(model, plan)      # memory cap, attention, CPU embeddings, fused loss (+ parked
                                              # head), fused LoRA, MLP tiles, checkpointing, compile
    collate = make_collator(plan, pad_id)     # packed rows (padded to plan.pack_multiple), or right padding
    restore_parked(model)                     # after training: a parked lm_head back on the GPU, no cap

What a model allows (a frozen untied embedding table, a plain lm_head, decoder layers) is asked by
`model_fits` BEFORE the plan is frozen, with the same eligibility tests the pieces use here, so the
plan already says what will be installed and its reasons are final. A plan that asks for something
its model cannot do (made for another model, or by hand) is a caller's error: ValueError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from ..adapters import base_model
from . import embed, head, loss
from . import memory as _memory
from .attention import install_attention

if TYPE_CHECKING:
    from .plan import FastPlan, ModelFits

__all__ = ["apply_fast_path", "decoder_layers", "make_collator", "model_fits", "restore_parked"]


def decoder_layers(model):
    """The decoder layer list of a (PEFT-wrapped or plain) HF causal LM, or None."""
    return getattr(getattr(base_model(model), "model", None), "layers", None)


def model_fits(model) -> "ModelFits":
    """What `model` allows, for the plan's deciders. Only a real nn.Module is inspected: a sizing
    stand-in (config + parameters) or None says nothing, and the config decides."""
    from .plan import ModelFits

    if not isinstance(model, torch.nn.Module):
        return ModelFits()
    lm, layers = base_model(model), decoder_layers(model)
    return ModelFits(layers=layers is not None, embeddings=embed.eligible(lm), fused_loss=loss.fusable(lm),
                     park_head=loss.fusable(lm) and head.parkable(lm, layers))


def model_device(model) -> torch.device | None:
    """The device of `model`'s first parameter (None: no model or no parameters to tell)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"this plan does not fit the model ({what}); make it with choose_plan(cfg, model)")


def apply_fast_path(model, plan: "FastPlan"):
    """Install the plan on a (PEFT-wrapped or plain) HF causal LM; returns the same model object."""
    device = model_device(model)
    if plan.budget is not None and device is not None and device.type == "cuda":
        _memory.enforce(plan.budget, device)  # the device-level budget holds: the allocator cannot grow past it
    install_attention(model, plan.attention, plan.single_sdpa)
    lm = base_model(model)
    if plan.cpu_embeddings:
        _require(embed.embeddings_to_cpu(lm), "input embeddings trained, tied or not a plain nn.Embedding")
    if plan.fused_loss:
        fused = loss.install_fused_loss(model, chunk=plan.loss_chunk_rows, park_head=plan.cpu_lm_head)
        _require(fused, "lm_head is not a plain bias-free nn.Linear")
    if plan.cpu_lm_head:
        _require(getattr(lm, "_llamaft_parked_head", None) is not None, "lm_head trained, tied or not on CUDA")
    if plan.fused_lora:
        from .lora import fuse_lora

        fuse_lora(model, nf4=plan.nf4_kernel)  # after the adapters are attached; PEFT-free models stay as they are
    layers = decoder_layers(model)
    if plan.tile_mlp_rows and layers is not None:
        from .recompute import tile_mlp

        for layer in layers:
            tile_mlp(layer.mlp, plan.tile_mlp_rows)
    _install_checkpointing_and_compile(model, plan, layers)
    return model


def _install_checkpointing_and_compile(model, plan: "FastPlan", layers) -> None:
    from .compile import compile_blocks, compile_fn

    if plan.checkpointing in ("own", "partial"):
        from .memory import layers_for
        from .recompute import install

        _require(layers is not None, "no decoder layer list for our checkpointing")
        policy = None
        if plan.checkpoint_tokens is not None:
            table = plan.checkpoint_tokens
            policy = lambda index, tokens: index < layers_for(table, tokens)  # noqa: E731
        wrap = compile_fn if plan.compile else None
        if plan.mlp_chunk_rows:
            from .recompute import defer_mlp

            for layer in layers:  # before the layer is wrapped: its compiled body calls this MLP as it is now
                defer_mlp(layer.mlp, plan.mlp_chunk_rows, wrap_body=wrap)
        # compile goes inside the checkpoint: streams and CPU copies stay out of the graph
        install(layers, offload=plan.offload_checkpoints, wrap_body=wrap, policy=policy)
        if hasattr(model, "config"):
            model.config.use_cache = False
        return
    if plan.checkpointing == "hf":
        # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads tricks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    if plan.compile:
        compile_blocks(layers)


def restore_parked(model) -> None:
    """After training: a parked lm_head back on the GPU for good (saving, merging, generation), and
    the allocator's training cap lifted."""
    _memory.lift_cap()
    parked = getattr(base_model(model), "_llamaft_parked_head", None)
    if parked is not None:
        parked.restore()


def make_collator(plan: "FastPlan", pad_id: int) -> Callable[[list[dict]], dict[str, Any]]:
    """The one choice of batches for the Trainer: packed single rows when plan.packing (a row of several
    examples padded with `pad_id` to a multiple of plan.pack_multiple tokens), else right padding."""
    if plan.packing:
        from ...data.pack import PackedCollator

        return PackedCollator(plan.pack_multiple, pad_id)
    from ...data.collate import Collator

    return Collator(pad_id)
