"""The plan's memory decisions (plan.py runs them in order): the device-level budget, whether and how
layers are recomputed, the memory-lean plan (checkpoints, frozen embeddings and lm_head in CPU memory,
the MLP deferred to the backward), the optimizer in the backward, and the micro-batch shape. Each is
a small function returning `(value, reason)` fed by the config, the estimate (memory.py) and earlier
decisions; numbers that came from measurements name the benchmark they came from.
"""

from __future__ import annotations

from dataclasses import replace

from . import memory as _memory

__all__ = ["MLP_CHUNK_ROWS", "QLORA_MICRO_BATCH_TOKENS", "TILE_MLP_ROWS", "checkpointing", "deferred_mlp", "lean_memory",
           "memory_budget", "micro_batches", "offload_checkpoints", "optimizer_in_backward", "own_checkpointing",
           "partial_checkpointing", "tile_mlp", "unpaged_optimizer", "widest_mlp_chunks"]

# MLP tiles for long micro-batches: a [16384, 14336] bf16 intermediate is 0.44 GiB; the 262,144-token
# QLoRA step trained with these tiles at 47 GiB (run13_maxlen_qlora_fast_long.json, run24_maxlen_qlora_nf4.json).
TILE_MLP_ROWS = 16384
# QLoRA micro-batch target, in mean tokens (mean example length x micro-batch). QLoRA is launch-bound,
# so larger micro-batches are the lever: W512 16 x 2 8,557-8,615 tok/s (run17_w512_qlora_fast.json)
# -> 32 x 1 (~9.6k tokens) 9,944 (run18_w512_qlora32.json), and with the parked lm_head and the NF4
# op 32 x 1 fits 6.02 GiB (run22/run23_w512_qlora_fast.json).
QLORA_MICRO_BATCH_TOKENS = 11264
# Tokens per chunk of a recomputed layer's deferred MLP (recompute.defer_mlp) in the memory-lean plan:
# [4096, 14336] bf16 gate/up/activation/product = 0.44 GiB live instead of ~1.5 GiB for a 12k-token
# micro-batch (QLoRA 32 x 1: the MLP's tensors were 1.5 of the 2.1 GiB above the weights at the peak,
# run22_memory_peak_qlora32_nf4.json), with rows large enough to keep the GEMMs efficient.
MLP_CHUNK_ROWS = 4096


# ---- memory: checkpointing, where checkpoints live, micro-batch shape
def checkpointing(cfg, model, tokens: int):
    """Recompute activations? auto: only when the estimate for the largest micro-batch (`tokens`)
    does not fit the budget (memory.py), as checkpointing costs ~45% more FLOPs at 8B."""
    gc_cfg = cfg.train.gradient_checkpointing
    if gc_cfg != "auto":
        return gc_cfg == "on", f"gradient checkpointing {gc_cfg} (train.gradient_checkpointing)"
    gc, why = _memory.needs_checkpointing(cfg, model, tokens)
    return gc, f"gradient checkpointing {'on' if gc else 'off'} (auto: {why})"


def own_checkpointing(gc: bool, distributed: bool):
    """Our checkpointing (recompute.py) or HF's. Ours is the reentrant kind, measured on one GPU
    only; under DDP HF's non-reentrant one fires each parameter's gradient hook exactly once."""
    if gc and distributed:
        return False, "checkpoints: HF's non-reentrant checkpointing, not offloaded (multi-process run)"
    return gc, None


def memory_budget(budget):
    """The device-level budget every estimate below is measured against (memory.read_budget)."""
    return budget, (budget.describe() if budget is not None else None)


def lean_memory(cfg, model, own: bool, tokens_of):
    """Memory-lean: checkpoints, frozen embeddings and lm_head in CPU memory, micro-batches by tokens.
    qlora always (picked for a small card); lora when even every layer checkpointed on the GPU would
    not fit the budget. Full fine-tuning trains its embeddings and head: never."""
    method = cfg.model.method
    if method == "qlora":
        return True, None  # the qlora lines below say so
    if method != "lora" or not own or not _memory.sizable(model):
        return False, None
    ok, why = _memory.fits(cfg, model, True, tokens_of(cfg.train.micro_batch_size))
    if ok:
        return False, None
    return True, f"memory-lean plan (every layer checkpointed on the GPU: {why})"


def _lean_why(cfg, lean: bool) -> str:
    if cfg.model.method == "qlora":
        return "qlora: memory-lean"
    return "memory-lean plan" if lean else "not memory-lean"


def offload_checkpoints(cfg, own: bool, lean: bool):
    """Our checkpoints' saved layer inputs in pinned CPU memory (auto: the memory-lean plan)."""
    if not own:
        return False, None
    setting = cfg.fast.offload_checkpoints
    if setting == "auto":
        on, why = lean, f"auto: {_lean_why(cfg, lean)}"
    else:
        on, why = setting == "on", f"fast.offload_checkpoints={setting}"
    return on, f"checkpoints {'offloaded to CPU' if on else 'kept on the GPU'} ({why})"


def unpaged_optimizer(cfg):
    """paged_adamw_8bit as bitsandbytes' unpaged 8-bit AdamW: the same update, but paged states live
    in CUDA unified memory outside torch's allocator, where the memory cap cannot hold them."""
    if cfg.train.optimizer != "paged_adamw_8bit":
        return False, None
    return True, "8-bit AdamW unpaged (fast path): its states count in the memory budget; same update as paged"


def deferred_mlp(cfg, own: bool, lean: bool, in_backward: bool):
    """Memory-lean: a recomputed layer's MLP runs in the backward in MLP_CHUNK_ROWS-token chunks
    (recompute.defer_mlp), no FLOPs added. Not with the optimizer in the backward (a chunked backward
    accumulates each weight's gradient once per chunk) nor with dropout (a chunk cannot repeat the
    first forward's masks)."""
    if not (own and lean) or in_backward or cfg.fast.deferred_mlp == "off":
        return 0, None
    if cfg.lora.dropout > 0:  # memory-lean is lora / qlora only
        return 0, f"MLP recomputed whole (lora.dropout={cfg.lora.dropout:g}: chunks cannot repeat the forward's masks)"
    return MLP_CHUNK_ROWS, (f"recomputed layers' MLP deferred to the backward, {MLP_CHUNK_ROWS} tokens at a time "
                            "(fast.deferred_mlp=auto): one chunk's intermediates live, no FLOPs added")


def widest_mlp_chunks(cfg, model, lengths, mbs: int, ga: int, layout) -> int:
    """The deferred MLP's chunk, as wide as the budget allows for the chosen micro-batch (fewer
    chunks: fewer launches, and QLoRA dequantises each weight once per chunk): 16384 or 8192 tokens
    where the estimate fits, else MLP_CHUNK_ROWS. Not logged (the deferral's line says it is on)."""
    if not layout.mlp_rows or not _memory.sizable(model):
        return layout.mlp_rows
    tokens = _memory.likely_tokens(cfg, lengths)(mbs)
    for rows in (4 * MLP_CHUNK_ROWS, 2 * MLP_CHUNK_ROWS):
        if _memory.fits(cfg, model, True, tokens, ga, replace(layout, mlp_rows=rows))[0]:
            return rows
    return layout.mlp_rows


def optimizer_in_backward(cfg, model, own: bool, tokens_of, distributed: bool):
    """Full fine-tuning: step each parameter's optimizer the moment its gradient is complete and free
    that gradient (train/in_backward.py), so no whole-model gradient (15 GiB at 8B) ever exists.
    auto: only when the budget needs it. One micro-batch per step; no global gradient clipping."""
    setting = cfg.fast.optimizer_in_backward
    if cfg.model.method != "full" or setting == "off":
        return False, None
    after = "gradient clipping (train.max_grad_norm) is not applied; one micro-batch per optimizer step"
    if cfg.train.optimizer == "adamw_torch_8bit":  # train/in_backward.py builds torch's and bitsandbytes' AdamW only
        return False, "optimizer steps after the backward (train.optimizer=adamw_torch_8bit)" if setting == "on" else None
    if distributed:
        return False, "optimizer steps after the backward (multi-process run)" if setting == "on" else None
    if setting == "on":
        return True, f"optimizer in the backward (fast.optimizer_in_backward=on): {after}"
    if not own:
        return False, None
    whole = tokens_of(cfg.train.micro_batch_size * cfg.train.gradient_accumulation)
    ok, why = _memory.fits(cfg, model, True, whole, 1)
    if ok:
        return False, None
    ok, why_in = _memory.fits(cfg, model, True, whole, 1, _memory.Layout(in_backward=True))
    if not ok:
        return False, f"optimizer in the backward would not fit either ({why_in})"
    return True, (f"optimizer in the backward (auto: with whole-model gradients {why}; without, {why_in}): "
                  f"each parameter is updated as its gradient completes, and the gradient freed; {after}")


def micro_batches(cfg, model, lengths, tokens_of, packing: bool, gc: bool, own: bool, lean: bool = False,
                  layout: _memory.Layout = _memory.Layout()):
    """(micro-batch, accumulation), same sequences per optimizer step: fewer, fuller kernels; only
    with packing (padded rows grow with the batch). Memory-lean (qlora): up to QLORA_MICRO_BATCH_TOKENS
    tokens, while the estimate fits. LoRA / full: the largest the estimate fits (W512 LoRA 8 x 4 ->
    16 x 2 +7%: run6_w512_lora_fast.json -> run7_w512_lora_fast_bs16_nogc.json), every layer
    checkpointed when checkpointing is ours; where partial_checkpointing will trim that, the shape
    with the cheapest estimated step (memory.partial_regroup: fewer launches against fewer recomputed
    layers); with HF's (DDP) as configured: the estimate is for ours. Optimizer in the backward: one
    micro-batch per step."""
    mbs, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    if layout.in_backward:
        return (mbs * ga, 1), f"micro-batches {mbs * ga} x 1 accumulation (optimizer in the backward)"
    if not packing or cfg.fast.regroup_batches != "auto":
        return (mbs, ga), None
    if lean:
        mbs, ga, why = _lean_regroup(cfg, model, lengths, tokens_of, layout)
    elif gc and own and _partial(cfg):
        mbs, ga, why = _memory.partial_regroup(cfg, model, lengths, tokens_of, layout)
    elif not gc or own:
        mbs, ga, why = _memory.regroup(cfg, model, tokens_of, checkpointing=gc, layout=layout)
    else:
        return (mbs, ga), None
    return (mbs, ga), f"micro-batches {mbs} x {ga} accumulation (fast.regroup_batches=auto: {why})"


def _lean_regroup(cfg, model, lengths, tokens_of, layout):
    """Up to QLORA_MICRO_BATCH_TOKENS mean tokens per micro-batch, fewer when the estimate at a
    micro-batch's likely most tokens (memory.likely_tokens) does not fit the budget."""
    mbs, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    likely = _memory.likely_tokens(cfg, lengths)
    most, parts, why = _memory.regroup_by_tokens(mbs, ga, lengths, QLORA_MICRO_BATCH_TOKENS)
    if not _memory.sizable(model):
        return most, parts, why
    for p in range(parts, ga + 1):
        if ga % p:
            continue
        m = mbs * ga // p
        ok, est = _memory.fits(cfg, model, True, likely(m), p, layout)
        if ok:
            return m, p, f"{why}; {est} at {likely(m)} tokens" if p == parts else f"{est} at {likely(m)} tokens"
    return mbs, ga, f"over budget even as configured ({est} at {likely(mbs)} tokens)"


def _partial(cfg) -> bool:
    """Layers recomputed per micro-batch (partial_checkpointing below) when checkpointing is ours."""
    return cfg.train.gradient_checkpointing == "auto" and cfg.fast.partial_checkpointing == "auto"


def partial_checkpointing(cfg, model, own: bool, worst: int, accumulation: int, lean: bool = False,
                          layout: _memory.Layout = _memory.Layout()):
    """(table, layers): when the estimate asked for our checkpointing (auto, not memory-lean), recompute
    only as many layers as each micro-batch's tokens need (memory.checkpoint_table)."""
    if not own or cfg.train.gradient_checkpointing != "auto" or lean:
        return (None, None), None
    table = None
    if _partial(cfg):
        table = _memory.checkpoint_table(cfg, model, worst, accumulation, layout)
    if table is None:
        return (None, None), "checkpointing every layer (fast.partial_checkpointing=off)"
    reason = f"checkpointing: {_memory.describe_table(table, worst)} (fast.partial_checkpointing=auto)"
    return (tuple(table), _memory.layers_for(table, worst)), reason


def tile_mlp(cfg, mlp_rows: int = 0):
    """MLP in TILE_MLP_ROWS-token chunks when a configured micro-batch can be longer (long context);
    not where the deferred MLP chunks it already (without the tiles' second MLP forward)."""
    if cfg.fast.tile_mlp != "auto" or cfg.data.max_seq_length * cfg.train.micro_batch_size <= TILE_MLP_ROWS:
        return 0, None
    if mlp_rows:
        return 0, None
    return TILE_MLP_ROWS, f"MLP in chunks of {TILE_MLP_ROWS} tokens when a micro-batch is longer (fast.tile_mlp=auto)"
