"""Should gradient checkpointing be on, and how large can a micro-batch be? A coarse estimate of
peak training memory vs the card.

Checkpointing costs ~45% more FLOPs at 8B (the whole forward is recomputed), so it is only worth it
when the activations would not fit. The estimate is deliberately pessimistic: the tokens of a
micro-batch are its longest possible content (the `micro_batch` longest training examples when the
plan knows them, else micro_batch x max_seq_length), and it is logged in the plan's reasons.
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


def estimate_peak_bytes(cfg, model, checkpointing: bool, tokens: int | None = None) -> int:
    c = model.config
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kvh = h // c.num_attention_heads * getattr(c, "num_key_value_heads", c.num_attention_heads)
    weights, trainable = _model_bytes(model)
    if cfg.model.method == "full" and trainable == 0:  # adapters not applied yet / everything trained
        trainable = sum(p.numel() for p in model.parameters())
    opt_bytes = 2 if "8bit" in cfg.train.optimizer else 8
    # grads in the weight dtype (bf16) + optimizer states
    state = trainable * (2 + opt_bytes)
    if tokens is None:
        tokens = cfg.train.micro_batch_size * cfg.data.max_seq_length
    per_layer = activation_bytes_per_token_layer(h, i, kvh)
    if checkpointing:  # layer inputs kept + one layer live during recomputation
        acts = tokens * (2 * h * layers + per_layer)
    else:
        acts = tokens * per_layer * layers
    loss_bytes = min(tokens, 2048) * c.vocab_size * 6 if cfg.fast.fused_loss != "off" else tokens * c.vocab_size * 10
    if cfg.model.method == "full":
        # the fused loss accumulates the trained lm_head's gradient in fp32, and the optimizer step
        # needs temporaries of the largest tensors (measured: W512 full 8 x 4 ran out at 72.8 GiB)
        loss_bytes += c.vocab_size * h * 4 + (1 << 30)
    return weights + state + acts + loss_bytes + (1 << 30)  # +1 GiB: CUDA context, allocator slack


def _usable_bytes() -> float:
    return torch.cuda.get_device_properties(0).total_memory * 0.9


def _sizable(model) -> bool:
    return model is not None and hasattr(model, "config") and torch.cuda.is_available()


def needs_checkpointing(cfg, model, tokens: int | None = None) -> tuple[bool, str]:
    if cfg.model.method == "qlora":
        # QLoRA is picked to fit a small memory budget: keep the activation footprint small as well
        return True, "qlora: memory-lean by choice"
    if not _sizable(model):
        return True, "no model/GPU to size: safe default"
    free = _usable_bytes()
    need = estimate_peak_bytes(cfg, model, checkpointing=False, tokens=tokens)
    gib = 1 << 30
    if need <= free:
        return False, f"estimated peak {need / gib:.1f} GiB fits in {free / gib:.1f} GiB"
    return True, f"estimated peak {need / gib:.1f} GiB > {free / gib:.1f} GiB usable"


def regroup(cfg, model, tokens_of) -> tuple[int, int, str]:
    """(micro-batch, accumulation) with the same sequences per optimizer step: the largest
    micro-batch (a multiple of the configured one) whose estimated peak without checkpointing fits."""
    mbs, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    if ga == 1:
        return mbs, ga, "no accumulation to merge"
    if not _sizable(model):
        return mbs, ga, "no model/GPU to size: as configured"
    free, gib = _usable_bytes(), 1 << 30
    for parts in range(1, ga):  # fewest micro-batches first
        if ga % parts:
            continue
        m = mbs * (ga // parts)
        need = estimate_peak_bytes(cfg, model, checkpointing=False, tokens=tokens_of(m))
        if need <= free:
            return m, parts, f"estimated peak {need / gib:.1f} GiB fits in {free / gib:.1f} GiB"
    return mbs, ga, "a larger micro-batch would not fit: as configured"


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
