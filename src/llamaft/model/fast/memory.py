"""Should gradient checkpointing be on, how large can a micro-batch be, and how many layers must a
given micro-batch recompute? A coarse estimate of peak training memory vs the budget (90% of the
card, or fast.memory_gib).

Checkpointing costs ~45% more FLOPs at 8B (the whole forward is recomputed), so it is only worth it
when the activations would not fit. The estimate is deliberately pessimistic: the tokens of a
micro-batch are its longest possible content (the `micro_batch` longest training examples when the
plan knows them, else micro_batch x max_seq_length), and it is logged in the plan's reasons. Only
the per-micro-batch layer count (`checkpoint_table` / `layers_for`) looks at the real micro-batch,
at run time, so typical micro-batches recompute fewer layers than the worst case would.
"""

from __future__ import annotations

import torch

# Bytes of saved activations per token per decoder layer without checkpointing, HF Llama + fused LoRA
# in bf16: two RMSNorms save their fp32 input (2 x 4H) and bf16 output (2 x 2H), attention saves
# q, k, v and its output (4H + 4 Hkv), the MLP saves gate, up, silu(gate) and the product (4 x 2I).
# Calibration: W512 LoRA 16 x 2 without checkpointing peaked at 54.6 GiB (run7), ~190 KiB per token
# and layer on its fullest micro-batch; this gives 184 KiB for Llama-3.1-8B.
def activation_bytes_per_token_layer(hidden: int, inter: int, kv_hidden: int) -> int:
    return 16 * hidden + 4 * kv_hidden + 8 * inter


def _model_bytes(model) -> tuple[int, int]:
    total, trainable = 0, 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def estimate_peak_bytes(cfg, model, checkpointing: bool | int, tokens: int | None = None,
                        accumulation: int | None = None) -> int:
    """Peak bytes in torch's allocator. `checkpointing`: False, True (every layer) or the number of
    layers checkpointed (the others keep their activations); `accumulation`: micro-batches per
    optimizer step (default: as configured)."""
    c = model.config
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kvh = h // c.num_attention_heads * getattr(c, "num_key_value_heads", c.num_attention_heads)
    weights, trainable = _model_bytes(model)
    full = cfg.model.method == "full"
    if full and trainable == 0:  # adapters not applied yet / everything trained
        trainable = sum(p.numel() for p in model.parameters())
    # paged 8-bit states live in CUDA unified memory (bitsandbytes), outside torch's allocator, and are
    # evicted to the CPU under pressure: they do not count against the budget
    opt_bytes = 0 if cfg.train.optimizer.startswith("paged") else 2 if "8bit" in cfg.train.optimizer else 8
    grads = trainable * (2 if full else 4)  # bf16 weights' grads; LoRA adapters are fp32 masters
    if tokens is None:
        tokens = cfg.train.micro_batch_size * cfg.data.max_seq_length
    per_layer = activation_bytes_per_token_layer(h, i, kvh)
    k = layers if checkpointing is True else int(checkpointing)
    # checkpointed layers keep their input (2h bytes a token) and one of them is live again during
    # its recomputation; the others keep all their activations
    ckpts, kept = tokens * 2 * h * k, tokens * per_layer * (layers - k)
    live = tokens * per_layer if k else 0
    from .loss import _chunk_rows

    # the fused loss holds one chunk of fp32 logits + its bf16 gradient; the plain loss all of them
    rows = cfg.fast.fused_loss != "off" and min(tokens, _chunk_rows(c.vocab_size))
    loss_bytes = rows * c.vocab_size * 6 if rows else tokens * c.vocab_size * 10
    # full fine-tuning: the fused loss hands over the trained lm_head's gradient (bf16, beside the
    # accumulated one), and the optimizer step needs temporaries of the largest tensors
    head_grad, step_tmp = (c.vocab_size * h * 2, 1 << 30) if full else (0, 0)
    if (accumulation or cfg.train.gradient_accumulation) > 1:
        # earlier micro-batches' gradients are there during every later forward
        dynamic = grads + ckpts + kept + live + loss_bytes + head_grad + step_tmp
    else:
        # one micro-batch per step: its forward runs before any gradient exists (the Trainer sets
        # them to None after the step), and the backward trades activations for gradients
        # (measured, W512 full 32 x 1: forward peak 20.7 GiB, backward + step 31.0 GiB)
        dynamic = max(ckpts + kept + loss_bytes + head_grad, grads + ckpts + live + step_tmp)
    return weights + trainable * opt_bytes + dynamic + (1 << 30)  # +1 GiB: CUDA context, allocator slack


# Share of the card the plan may fill: headroom for the allocator's fragmentation. A margin chosen with
# the first estimate, not measured; the estimate itself was calibrated on run7 (see above).
CARD_FRACTION = 0.9


def _usable_bytes() -> float:
    return torch.cuda.get_device_properties(0).total_memory * CARD_FRACTION


def budget_bytes(cfg) -> float:
    """What the plan may use: fast.memory_gib when set (a shared card, a target), else 90% of the card."""
    gib = getattr(cfg.fast, "memory_gib", None)
    return gib * (1 << 30) if gib else _usable_bytes()


def _sizable(model) -> bool:
    return model is not None and hasattr(model, "config") and torch.cuda.is_available()


def needs_checkpointing(cfg, model, tokens: int | None = None) -> tuple[bool, str]:
    if cfg.model.method == "qlora":
        # QLoRA is picked to fit a small memory budget: keep the activation footprint small as well
        return True, "qlora: memory-lean by choice"
    if not _sizable(model):
        return True, "no model/GPU to size: safe default"
    free = budget_bytes(cfg)
    need = estimate_peak_bytes(cfg, model, checkpointing=False, tokens=tokens)
    gib = 1 << 30
    if need <= free:
        return False, f"estimated peak {need / gib:.1f} GiB fits in {free / gib:.1f} GiB"
    return True, f"estimated peak {need / gib:.1f} GiB > {free / gib:.1f} GiB usable"


def checkpoint_table(cfg, model, max_tokens: int, accumulation: int | None = None) -> list[int] | None:
    """table[k] = the most tokens a micro-batch may hold with only its first k decoder layers
    checkpointed (-1: none fit), within the budget; None without a model/GPU to size. Micro-batches
    vary (packing: their token counts, not their sequence counts, set the activations), so the
    layer count is picked per micro-batch at run time: `layers_for(table, tokens)`."""
    if not _sizable(model):
        return None
    free, table = budget_bytes(cfg), []
    for k in range(model.config.num_hidden_layers + 1):
        lo, hi = -1, max_tokens  # binary search: the estimate grows with the tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if estimate_peak_bytes(cfg, model, checkpointing=k, tokens=mid, accumulation=accumulation) <= free:
                lo = mid
            else:
                hi = mid - 1
        table.append(lo)
    return table


def layers_for(table: list[int], tokens: int) -> int:
    """The fewest layers to checkpoint for a micro-batch of `tokens` (all of them when nothing fits)."""
    for k, most in enumerate(table):
        if tokens <= most:
            return k
    return len(table) - 1


def describe_table(table: list[int], worst: int) -> str:
    layers = len(table) - 1
    k = layers_for(table, worst)
    fits = table[k] >= worst
    steps = sorted({layers_for(table, t) for t in (worst // 4, worst // 2, 3 * worst // 4, worst)})
    shown = ", ".join(f"{j} up to {table[j]} tokens" for j in steps if table[j] >= 0)
    return (f"layers recomputed per micro-batch by its tokens ({shown}); worst case {worst} tokens: {k} of {layers}"
            + ("" if fits else " (over budget even so)"))


def regroup(cfg, model, tokens_of, checkpointing: bool = False) -> tuple[int, int, str]:
    """(micro-batch, accumulation) with the same sequences per optimizer step: the largest
    micro-batch (a multiple of the configured one) whose estimated peak fits (with every layer
    checkpointed when `checkpointing`: fewer, larger micro-batches, then as few recomputed layers
    as the rest of the budget allows)."""
    mbs, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    if ga == 1:
        return mbs, ga, "no accumulation to merge"
    if not _sizable(model):
        return mbs, ga, "no model/GPU to size: as configured"
    free, gib = budget_bytes(cfg), 1 << 30
    for parts in range(1, ga):  # fewest micro-batches first
        if ga % parts:
            continue
        m = mbs * (ga // parts)
        need = estimate_peak_bytes(cfg, model, checkpointing=checkpointing, tokens=tokens_of(m), accumulation=parts)
        if need <= free:
            return m, parts, f"estimated peak {need / gib:.1f} GiB fits in {free / gib:.1f} GiB"
    return mbs, ga, "a larger micro-batch would not fit: as configured"


def micro_batch_tokens(cfg, lengths: list[int] | None):
    """micro-batch size -> the most tokens one micro-batch can hold: its `m` longest training
    examples (capped at max_seq_length) when the lengths are known, else m x max_seq_length."""
    cap = cfg.data.max_seq_length
    if not lengths:
        return lambda m: m * cap
    longest = sorted((min(n, cap) for n in lengths), reverse=True)
    return lambda m: sum(longest[:m]) if m <= len(longest) else sum(longest) + (m - len(longest)) * cap


def regroup_by_tokens(mbs: int, ga: int, lengths: list[int] | None, target: int) -> tuple[int, int, str]:
    """(micro-batch, accumulation), same sequences per optimizer step: the largest micro-batch whose
    MEAN token count (mean example length x micro-batch) stays within `target`."""
    if ga == 1:
        return mbs, ga, "no accumulation to merge"
    if not lengths:
        return mbs, ga, "example lengths unknown: as configured"
    mean = sum(lengths) / len(lengths)
    for parts in range(1, ga):
        if ga % parts == 0 and mean * mbs * ga // parts <= target:
            m = mbs * ga // parts
            return m, parts, f"~{mean * m:.0f} tokens per micro-batch <= {target}"
    return mbs, ga, f"~{mean * mbs:.0f} tokens per micro-batch already; as configured"
