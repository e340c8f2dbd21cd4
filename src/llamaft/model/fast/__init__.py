"""GPU fast path for training (issue 5): packing, varlen attention, fused loss, checkpointing choice.

What `llamaft.train` calls, in this order:

    plan = choose_plan(cfg, model, lengths) # decide (pure: reads cfg, the model's size, the device and
                                            # the training examples' token counts)
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
    # Checkpointing by model/fast/recompute.py (not HF's): layer inputs optionally parked in CPU memory
    own_checkpointing: bool = False
    offload_checkpoints: bool = False
    micro_batch_size: int | None = None       # None: train.micro_batch_size as configured
    gradient_accumulation: int | None = None  # same sequences per optimizer step as configured
    fused_optimizer: bool = False             # adamw_torch -> torch's fused (single-kernel) AdamW
    tile_mlp_rows: int = 0                    # > 0: MLP in chunks of this many tokens (long sequences)
    loss_chunk_rows: int | None = None        # fused loss rows per chunk (None: ~512 MiB of logits)
    single_sdpa: bool = True                  # varlen rows with one example -> causal SDPA (cuDNN)
    cpu_embeddings: bool = False              # frozen input embedding table in CPU memory (model/fast/embed.py)
    # own checkpointing of the first N decoder layers only, N chosen per micro-batch from its tokens:
    # checkpoint_tokens[N] = most tokens that fit with N layers checkpointed (None: every layer, always)
    checkpoint_tokens: list[int] | None = None
    checkpoint_layers: int | None = None      # N for the largest micro-batch the data can form (reported)
    cpu_lm_head: bool = False                 # frozen lm_head parked in CPU memory between losses (head.py)
    nf4_kernel: bool = False                  # QLoRA: NF4 base + LoRA as one opaque op (lora_nf4.py, nf4.py)


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


def choose_plan(cfg, model=None, lengths: list[int] | None = None) -> FastPlan:
    """Decide each part of the fast path from the config (explicit on/off wins) and the hardware.

    `lengths`: token counts of the training examples; with packing they bound the tokens of a
    micro-batch far better than micro_batch_size x max_seq_length does (memory estimates).
    """
    from .attention import best_packed_attention
    from .memory import checkpoint_table, describe_table, layers_for, needs_checkpointing, regroup, regroup_by_tokens

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

    tokens_of = _micro_batch_tokens(cfg, lengths if packing else None)
    if gc_cfg == "auto":
        gc, why = needs_checkpointing(cfg, model, tokens_of(cfg.train.micro_batch_size))
        reasons.append(f"gradient checkpointing {'on' if gc else 'off'} (auto: {why})")
    else:
        gc = gc_cfg == "on"
        reasons.append(f"gradient checkpointing {gc_cfg} (train.gradient_checkpointing)")

    # Offloaded checkpoints: the per-layer inputs wait in pinned CPU memory (model/fast/recompute.py)
    offload = False
    own_ckpt = gc
    if gc and _distributed():
        # Our checkpoint is the reentrant kind, measured on one GPU only; under DDP keep HF's
        # non-reentrant one (each parameter's gradient hook fires exactly once per backward).
        own_ckpt = False
        reasons.append("checkpoints: HF's non-reentrant checkpointing, not offloaded (multi-process run)")
    if own_ckpt:
        if f.offload_checkpoints == "auto":
            offload = cfg.model.method == "qlora"
            reasons.append(f"checkpoints {'offloaded to CPU' if offload else 'kept on the GPU'} (auto: {'qlora: memory-lean' if offload else 'not qlora'})")
        else:
            offload = f.offload_checkpoints == "on"
            reasons.append(f"checkpoints {'offloaded to CPU' if offload else 'kept on the GPU'} (fast.offload_checkpoints={f.offload_checkpoints})")

    # Larger micro-batches, same sequences per optimizer step: fewer, fuller kernels. LoRA / full:
    # the largest that the estimate fits (W512 LoRA 8x4 -> 16x2 +7%). QLoRA: up to ~11k tokens
    # (mean example length x micro-batch): it is launch-bound, so larger micro-batches are the lever
    # (W512 QLoRA 8x4 -> 16x2: +47%, 16x2 -> 32x1: +~15%), and with the lm_head parked and no
    # dequantised weights saved 32 x 1 still fits ~7 GiB (benchmarks/README.md). Only with packing.
    mbs, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    if packing and f.regroup_batches == "auto" and cfg.model.method == "qlora":
        mbs, ga, why = regroup_by_tokens(mbs, ga, lengths, _QLORA_TOKENS)
        reasons.append(f"micro-batches {mbs} x {ga} accumulation (fast.regroup_batches=auto: {why})")
    elif packing and f.regroup_batches == "auto" and (not gc or own_ckpt):
        # with checkpointing (the estimate asked for it): the largest micro-batch that fits with every
        # layer checkpointed; then below, as few recomputed layers as the rest of the budget allows
        mbs, ga, why = regroup(cfg, model, tokens_of, checkpointing=gc)
        reasons.append(f"micro-batches {mbs} x {ga} accumulation (fast.regroup_batches=auto: {why})")

    ckpt_layers = ckpt_table = None
    if own_ckpt and gc_cfg == "auto" and cfg.model.method != "qlora":
        # the estimate asked for checkpointing: recompute only the layers that must be
        worst = tokens_of(mbs)
        ckpt_table = checkpoint_table(cfg, model, worst, ga) if f.partial_checkpointing == "auto" else None
        if ckpt_table is not None:
            ckpt_layers = layers_for(ckpt_table, worst)
            reasons.append(f"checkpointing: {describe_table(ckpt_table, worst)} (fast.partial_checkpointing=auto)")
        else:
            reasons.append("checkpointing every layer (fast.partial_checkpointing=off)")
    fused_opt = cfg.train.optimizer == "adamw_torch" and f.fused_optimizer != "off"
    if cfg.train.optimizer == "adamw_torch":
        reasons.append(f"torch fused AdamW {'on' if fused_opt else 'off'} (fast.fused_optimizer={f.fused_optimizer})")

    # compile: measured +8% on W512 LoRA without checkpointing, +28-33% on QLoRA (fewer launches:
    # QLoRA is launch-bound) and +17% on full fine-tuning (32 x 1, partial checkpointing: 7,907 vs
    # 6,763 tok/s, same invocation; benchmarks/README.md) for ~60-90 s of compilation; auto turns it
    # on there (checkpointed LoRA was not measured)
    if f.compile == "auto":
        comp = (cfg.model.method == "lora" and not gc) or cfg.model.method in ("qlora", "full")
        reasons.append(f"torch.compile {'on' if comp else 'off'} (auto: {'measured to win here' if comp else 'only measured to win for qlora, full, and lora without checkpointing'})")
    else:
        comp = f.compile == "on"
        reasons.append(f"torch.compile {comp and 'on' or 'off'} (fast.compile={f.compile})")
    reasons.append("fused LoRA linears on (fast path): scale and add inside the GEMMs")
    nf4 = cfg.model.method == "qlora" and f.nf4_kernel != "off"
    if cfg.model.method == "qlora":
        reasons.append(f"NF4 base layers: {'one op: one-pass Triton dequant + base and LoRA GEMMs' if nf4 else 'bitsandbytes forward'} (fast.nf4_kernel={f.nf4_kernel})")
    if attention == "varlen":
        reasons.append(f"rows holding one example: {'causal SDPA (cuDNN where available)' if f.single_sequence_sdpa != 'off' else 'varlen'} (fast.single_sequence_sdpa={f.single_sequence_sdpa})")
    cpu_emb = f.cpu_embeddings == "on" or (f.cpu_embeddings == "auto" and cfg.model.method == "qlora")
    reasons.append(f"input embeddings {'in CPU memory when frozen and untied' if cpu_emb else 'on the GPU'} (fast.cpu_embeddings={f.cpu_embeddings})")
    cpu_head = fused and (f.cpu_lm_head == "on" or (f.cpu_lm_head == "auto" and cfg.model.method == "qlora"))
    reasons.append(f"lm_head {'parked in CPU memory between losses when frozen and untied' if cpu_head else 'on the GPU'} (fast.cpu_lm_head={f.cpu_lm_head})")
    tile = _TILE_ROWS if f.tile_mlp == "auto" and cfg.data.max_seq_length * cfg.train.micro_batch_size > _TILE_ROWS else 0
    if tile:
        reasons.append(f"MLP in chunks of {tile} tokens when a micro-batch is longer (fast.tile_mlp=auto)")
    return FastPlan(packing, attention, fused, gc, comp, reasons, fused_lora=True, own_checkpointing=own_ckpt,
                    offload_checkpoints=offload, micro_batch_size=mbs, gradient_accumulation=ga,
                    fused_optimizer=fused_opt, tile_mlp_rows=tile, single_sdpa=f.single_sequence_sdpa != "off",
                    cpu_embeddings=cpu_emb, cpu_lm_head=cpu_head, nf4_kernel=nf4, checkpoint_layers=ckpt_layers,
                    checkpoint_tokens=ckpt_table,
                    loss_chunk_rows=256 if cfg.model.method == "qlora" else None)


_TILE_ROWS = 16384  # [16k, 14336] bf16 MLP intermediates: 0.44 GiB each
_QLORA_TOKENS = 11264  # QLoRA micro-batch target (mean tokens), see regroup_by_tokens


def _distributed() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _micro_batch_tokens(cfg, lengths: list[int] | None):
    """micro-batch size -> the most tokens one micro-batch can hold (for memory estimates)."""
    cap = cfg.data.max_seq_length
    if not lengths:
        return lambda m: m * cap
    longest = sorted((min(n, cap) for n in lengths), reverse=True)
    return lambda m: sum(longest[:m]) if m <= len(longest) else sum(longest) + (m - len(longest)) * cap


def apply_fast_path(model, plan: FastPlan):
    """Install the plan on a (PEFT-wrapped or plain) HF causal LM; returns the same model object."""
    from .attention import install_attention
    from .loss import install_fused_loss

    install_attention(model, plan.attention, plan.single_sdpa)
    if plan.cpu_embeddings:
        from .embed import embeddings_to_cpu

        if not embeddings_to_cpu(_unwrapped(model)):
            plan.cpu_embeddings = False
            plan.reasons.append("input embeddings stay on the GPU: trained, tied to the lm_head, or not a plain nn.Embedding")
    if plan.fused_loss and not install_fused_loss(model, chunk=plan.loss_chunk_rows, park_head=plan.cpu_lm_head):
        plan.fused_loss = False
        plan.reasons.append("fused loss off: lm_head is not a plain bias-free nn.Linear")
    if plan.cpu_lm_head and getattr(_unwrapped(model), "_llamaft_parked_head", None) is None:
        plan.cpu_lm_head = False
        plan.reasons.append("lm_head stays on the GPU: trained, tied to the input embeddings, or not on CUDA")
    if plan.fused_lora:
        from .lora import fuse_lora

        fuse_lora(model, nf4=plan.nf4_kernel)  # call after the adapters are attached; PEFT-free models are left as they are
    layers = decoder_layers(model)
    if plan.tile_mlp_rows and layers is not None:
        from .recompute import tile_mlp

        for layer in layers:
            tile_mlp(layer.mlp, plan.tile_mlp_rows)
    if plan.gradient_checkpointing and plan.own_checkpointing and layers is not None:
        from .compile import compile_fn
        from .recompute import install

        # compile goes inside the checkpoint: streams and CPU copies stay out of the graph
        policy = None
        if plan.checkpoint_tokens is not None:
            from .memory import layers_for

            table = plan.checkpoint_tokens
            policy = lambda index, tokens: index < layers_for(table, tokens)  # noqa: E731
        install(layers, offload=plan.offload_checkpoints, wrap_body=compile_fn if plan.compile else None,
                policy=policy)
        if hasattr(model, "config"):
            model.config.use_cache = False
    else:
        if plan.gradient_checkpointing:
            plan.own_checkpointing = plan.offload_checkpoints = False  # no layer list: HF's checkpointing
            _enable_checkpointing(model)
        if plan.compile:
            from .compile import compile_blocks

            compile_blocks(layers)
    return model


def restore_parked(model) -> None:
    """After training: a parked lm_head back on the GPU for good (saving, merging, generation)."""
    parked = getattr(_unwrapped(model), "_llamaft_parked_head", None)
    if parked is not None:
        parked.restore()


def _unwrapped(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model):
    return getattr(getattr(_unwrapped(model), "model", None), "layers", None)


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
