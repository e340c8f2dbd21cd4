"""How much of the card may this run take, and what fits in it: should gradient checkpointing be on,
how large can a micro-batch be, how many layers must a given micro-batch recompute? A coarse
estimate of the peak in torch's allocator vs the budget (`read_budget`: the card's free memory, or
fast.memory_gib) -- a device-level budget: what the process adds outside the allocator (CUDA
context, kernel images, library workspaces) is taken off it first, and the allocator is capped at
the rest (`enforce`), so the promise holds on the card, not only in torch's own count.

Checkpointing costs ~45% more FLOPs at 8B (the whole forward is recomputed), so it is only worth it
when the activations would not fit. The estimate is deliberately pessimistic: the tokens of a
micro-batch are its longest possible content (the `micro_batch` longest training examples when the
plan knows them, else micro_batch x max_seq_length), and it is logged in the plan's reasons. Only
the per-micro-batch layer count (`checkpoint_table` / `layers_for`) looks at the real micro-batch,
at run time, so typical micro-batches recompute fewer layers than the worst case would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 1 << 30

# Bytes of saved activations per token per decoder layer without checkpointing, HF Llama + fused LoRA
# in bf16: two RMSNorms save their fp32 input (2 x 4H) and bf16 output (2 x 2H), attention saves
# q, k, v and its output (4H + 4 Hkv), the MLP saves gate, up, silu(gate) and the product (4 x 2I).
# Calibration: W512 LoRA 16 x 2 without checkpointing peaked at 54.6 GiB (run7), ~190 KiB per token
# and layer on its fullest micro-batch; this gives 184 KiB for Llama-3.1-8B.
def activation_bytes_per_token_layer(hidden: int, inter: int, kv_hidden: int) -> int:
    return 16 * hidden + 4 * kv_hidden + 8 * inter


def _model_bytes(model) -> tuple[int, int, int]:
    """(bytes of every parameter, trainable parameter count, largest parameter's element count)."""
    total, trainable, largest = 0, 0, 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        largest = max(largest, p.numel())
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable, largest


@dataclass(frozen=True)
class Layout:
    """The plan's choices that move memory off the card or shorten its life, for the estimate."""

    offload: bool = False          # checkpointed layer inputs in pinned CPU memory (recompute.py)
    cpu_embeddings: bool = False   # the frozen input embedding table in CPU memory (embed.py)
    cpu_lm_head: bool = False      # the frozen lm_head parked in CPU memory, on the card only for a loss (head.py)
    in_backward: bool = False      # each gradient freed by its own optimizer step in the backward
    mlp_rows: int = 0              # > 0: a recomputed layer's MLP runs in the backward in chunks of this many tokens
    loss_rows: int | None = None   # the fused loss's rows per chunk (plan.loss_chunk_rows; None: loss.py's default)


# Temporaries the terms below do not name (RMSNorm / RoPE outputs, cuBLAS workspaces in the allocator).
ESTIMATE_SLACK_BYTES = GIB // 4


def optimizer_bytes_per_param(optimizer: str) -> int:
    """8-bit AdamW: two uint8 moments; AdamW: two fp32 moments. Paged states count too: on the fast
    path they run unpaged (plan.unpaged_optimizer), inside the budget."""
    return 2 if "8bit" in optimizer else 8


def estimate_peak_bytes(cfg, model, checkpointing: bool | int, tokens: int | None = None,
                        accumulation: int | None = None, layout: Layout = Layout()) -> int:
    """Peak bytes in torch's allocator. `checkpointing`: False, True (every layer) or the number of
    layers checkpointed (the others keep their activations); `accumulation`: micro-batches per
    optimizer step (default: as configured); `layout`: what lives in CPU memory instead."""
    c = model.config
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kvh = h // c.num_attention_heads * getattr(c, "num_key_value_heads", c.num_attention_heads)
    weights, trainable, largest = _model_bytes(model)
    full = cfg.model.method == "full"
    if full and trainable == 0:  # adapters not applied yet / everything trained
        trainable = sum(p.numel() for p in model.parameters())
    table = c.vocab_size * h * 2  # one bf16 [vocab, hidden] table: the embeddings or the lm_head
    weights -= table * (layout.cpu_embeddings + layout.cpu_lm_head)
    # bf16 weights' grads (full), fp32 LoRA masters' grads; in the backward, one at a time (at most a
    # [vocab, hidden] table: the largest tensor of a Llama)
    grads = (min(largest * 2, table) if layout.in_backward else trainable * 2) if full else trainable * 4
    if tokens is None:
        tokens = cfg.train.micro_batch_size * cfg.data.max_seq_length
    per_layer = activation_bytes_per_token_layer(h, i, kvh)
    k = layers if checkpointing is True else int(checkpointing)
    # checkpointed layers keep their input (2h bytes a token; offloaded: only the next one, fetched
    # back ahead of its recomputation) and one of them is live again during its recomputation; the
    # others keep all their activations
    ckpts = tokens * 2 * h * (2 if layout.offload else k)
    kept, live = tokens * per_layer * (layers - k), (tokens * per_layer if k else 0)
    if k and layout.mlp_rows:  # the MLP's [tokens, intermediate] tensors exist one chunk at a time
        live = tokens * (per_layer - 8 * i) + min(tokens, layout.mlp_rows) * 8 * i
    from .loss import _chunk_rows

    # the fused loss holds one chunk of fp32 logits + its bf16 gradient; the plain loss all of them;
    # a parked lm_head is on the card for the loss
    rows = cfg.fast.fused_loss != "off" and min(tokens, layout.loss_rows or _chunk_rows(c.vocab_size))
    loss_bytes = (rows * c.vocab_size * 6 if rows else tokens * c.vocab_size * 10) + table * layout.cpu_lm_head
    # full fine-tuning: the fused loss hands over the trained lm_head's gradient (bf16, beside the
    # accumulated one), and the optimizer step needs temporaries of the largest tensors
    head_grad, step_tmp = (table, GIB) if full else (0, 0)
    if layout.in_backward:
        step_tmp = GIB // 4  # one parameter's update at a time
    if (accumulation or cfg.train.gradient_accumulation) > 1:
        # earlier micro-batches' gradients are there during every later forward
        dynamic = grads + ckpts + kept + live + loss_bytes + head_grad + step_tmp
    else:
        # one micro-batch per step: its forward runs before any gradient exists (the Trainer sets
        # them to None after the step), and the backward trades activations for gradients
        # (measured, W512 full 32 x 1: forward peak 20.7 GiB, backward + step 31.0 GiB)
        dynamic = max(ckpts + kept + loss_bytes + head_grad, grads + ckpts + live + step_tmp)
    states = trainable * optimizer_bytes_per_param(cfg.train.optimizer)
    if full and cfg.train.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        states += c.vocab_size * h * 6  # the input embeddings keep 32-bit states, as HF sets up bitsandbytes
    return weights + states + dynamic + ESTIMATE_SLACK_BYTES


# What a training process holds on the device OUTSIDE torch's caching allocator: the CUDA context,
# kernel images loaded on first use (cuBLAS, cuDNN, flash-attention, Triton's compiled kernels) and
# library workspaces. LATER_OUTSIDE_BYTES is the part not there yet when the plan is made (the model
# is loaded by then; the backward's kernels and the compiled blocks come later).
# Measured on the H200, device peak - reserved peak: 0.74-0.81 GiB for LoRA (compiled, 18 GiB card and
# whole card) and QLoRA (7.5 GiB card) (benchmarks/results/budget_h200/call1_*.tgz); the CUDA context itself
# (~0.5 GiB) is there before the plan.
OUTSIDE_ALLOCATOR_BYTES = GIB
LATER_OUTSIDE_BYTES = GIB // 2
# Blocks the allocator cannot hand out even after freeing its cache (fragmentation; expandable
# segments keep it small), and the estimate's own error.
ALLOCATOR_SLACK = 0.05


@dataclass(frozen=True)
class Budget:
    """This run's share of the card: `device_bytes` is the promise (the device-level peak it may
    reach), `cap_bytes` what torch's allocator may reserve (`enforce`), `plan_bytes` what the
    estimates below may fill."""

    device_bytes: int
    cap_bytes: int
    total_bytes: int
    source: str  # where the number came from, for the plan's reason line

    @property
    def plan_bytes(self) -> float:
        return self.cap_bytes * (1 - ALLOCATOR_SLACK)

    def describe(self) -> str:
        return (f"memory budget {self.device_bytes / GIB:.1f} GiB on the device ({self.source}): "
                f"torch's allocator capped at {self.cap_bytes / GIB:.1f} GiB, the rest is the CUDA context and kernels")


def _card() -> tuple[int, int, int]:
    """(free, total, reserved by this process's allocator) bytes on the current CUDA device."""
    free, total = torch.cuda.mem_get_info()
    return free, total, torch.cuda.memory_reserved()


def make_budget(memory_gib: float | None, free: int, total: int, reserved: int) -> Budget:
    """The budget from the card's state: what is free plus what our allocator already holds (the
    loaded model), less what will still come outside the allocator; fast.memory_gib, when set, is a
    device-level promise within that."""
    reachable = free + reserved - LATER_OUTSIDE_BYTES
    if not memory_gib:
        return Budget(int(free + reserved), int(reachable), int(total), "the card's free memory at the start")
    device = int(memory_gib * GIB)
    cap = device - OUTSIDE_ALLOCATOR_BYTES
    source = f"fast.memory_gib={memory_gib:g}"
    if cap > reachable:
        cap, source = reachable, source + f"; only {(free + reserved) / GIB:.1f} GiB free on the card"
    return Budget(device, int(cap), int(total), source)


def read_budget(cfg) -> Budget | None:
    """This run's budget on the current CUDA device (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return make_budget(getattr(cfg.fast, "memory_gib", None), *_card())


def budget_bytes(cfg) -> float:
    """What the plan's estimates may fill (allocator bytes): see `read_budget`."""
    budget = read_budget(cfg)
    return budget.plan_bytes if budget is not None else float("inf")


def configure_allocator() -> bool:
    """Expandable segments for torch's CUDA allocator, unless the user set PYTORCH_CUDA_ALLOC_CONF:
    variable-size packed micro-batches otherwise fragment the cache (W512 LoRA: 67.8 GiB allocated,
    123 GiB on the card; QLoRA 10.6 -> 9.1 GiB at the same speed, ../shared/bench/h200.md). Segments
    made before this (a loaded model) stay as they are. True when set here."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or not torch.cuda.is_available():
        return False
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True


def enforce(budget: Budget, device=None) -> None:
    """Cap torch's allocator at the budget: past it, the allocator frees its cache and retries
    before it fails, instead of growing past the promise."""
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget.cap_bytes / budget.total_bytes), device)


def lift_cap() -> None:
    """No cap (after training: evaluation and merging are not budgeted)."""
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)


def sizable(model) -> bool:
    """A model whose config and parameters the estimate can read, on a CUDA machine."""
    return model is not None and hasattr(model, "config") and torch.cuda.is_available()


def fits(cfg, model, checkpointing: bool | int, tokens: int, accumulation: int | None = None,
         layout: Layout = Layout()) -> tuple[bool, str]:
    """(estimate <= budget, "estimated peak X GiB fits in / > Y GiB")."""
    free, need = budget_bytes(cfg), estimate_peak_bytes(cfg, model, checkpointing, tokens, accumulation, layout)
    if need <= free:
        return True, f"estimated peak {need / GIB:.1f} GiB fits in {free / GIB:.1f} GiB"
    return False, f"estimated peak {need / GIB:.1f} GiB > {free / GIB:.1f} GiB usable"


def needs_checkpointing(cfg, model, tokens: int | None = None) -> tuple[bool, str]:
    if cfg.model.method == "qlora":
        # QLoRA is picked to fit a small memory budget: keep the activation footprint small as well
        return True, "qlora: memory-lean by choice"
    if not sizable(model):
        return True, "no model/GPU to size: safe default"
    ok, why = fits(cfg, model, False, tokens)
    return not ok, why


def checkpoint_table(cfg, model, max_tokens: int, accumulation: int | None = None,
                     layout: Layout = Layout()) -> list[int] | None:
    """table[k] = the most tokens a micro-batch may hold with only its first k decoder layers
    checkpointed (-1: none fit), within the budget; None without a model/GPU to size. Micro-batches
    vary (packing: their token counts, not their sequence counts, set the activations), so the
    layer count is picked per micro-batch at run time: `layers_for(table, tokens)`."""
    if not sizable(model):
        return None
    free, table = budget_bytes(cfg), []
    for k in range(model.config.num_hidden_layers + 1):
        lo, hi = -1, max_tokens  # binary search: the estimate grows with the tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if estimate_peak_bytes(cfg, model, k, mid, accumulation, layout) <= free:
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


def regroup(cfg, model, tokens_of, checkpointing: bool = False, layout: Layout = Layout(),
            most_parts: int | None = None) -> tuple[int, int, str]:
    """(micro-batch, accumulation) with the same sequences per optimizer step: the largest
    micro-batch (a multiple of the configured one) whose estimated peak fits (with every layer
    checkpointed when `checkpointing`: fewer, larger micro-batches, then as few recomputed layers
    as the rest of the budget allows). `most_parts`: only 1 .. most_parts micro-batches per step
    (optimizer in the backward: one)."""
    mbs, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    if ga == 1:
        return mbs, ga, "no accumulation to merge"
    if not sizable(model):
        return mbs, ga, "no model/GPU to size: as configured"
    free, gib = budget_bytes(cfg), 1 << 30
    for parts in range(1, min(ga, most_parts or ga)):  # fewest micro-batches first
        if ga % parts:
            continue
        m = mbs * (ga // parts)
        need = estimate_peak_bytes(cfg, model, checkpointing, tokens_of(m), parts, layout)
        if need <= free:
            return m, parts, f"estimated peak {need / gib:.1f} GiB fits in {free / gib:.1f} GiB"
    return mbs, ga, "a larger micro-batch would not fit: as configured"


# The recomputation's share of a step, per recomputed layer fraction: LoRA's backward computes input
# gradients only (fwd + bwd ~ 2 forwards: one more forward is +50%), full fine-tuning's weight
# gradients too (~3 forwards: +33%). W512 LoRA at 40 GiB, 32 x 1 with ~20 of 32 layers recomputed:
# 12,475 tok/s against 16,237 with none (1.30x; this predicts 1.31x; profile_h200/call3_*.json).
RECOMPUTE_COST = {"lora": 0.5, "qlora": 0.5, "full": 1 / 3}
# What one more micro-batch per step costs, in tokens of work: ~2,000 kernels launched per
# micro-batch whatever its size, and smaller GEMMs. Fitted on W512 LoRA at 40 GiB on the H200
# (tok/s 32 x 1: 12,475, 16 x 2: 13,397, 8 x 4: 11,646; profile_h200/call3_*.json): ~1,350 tokens of
# Llama-3.1-8B. Scaled to other models by a layer's weights: launches per layer are the same, the
# work per token and layer grows with its matrices.
MICRO_BATCH_OVERHEAD_TOKENS = 1350
_OVERHEAD_REF_LAYER = 4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336  # Llama-3.1-8B: q, o, k, v, MLP


def step_cost(cfg, model, parts: int, typical: int, recomputed: int) -> float:
    """A step's work in token-equivalents: `parts` micro-batches of `typical` tokens, each recomputing
    `recomputed` layers, plus each micro-batch's fixed overhead."""
    c = model.config
    h, kvh = c.hidden_size, c.hidden_size // c.num_attention_heads * getattr(c, "num_key_value_heads", c.num_attention_heads)
    layer = h * (2 * h + 2 * kvh) + 3 * h * c.intermediate_size
    overhead = MICRO_BATCH_OVERHEAD_TOKENS * _OVERHEAD_REF_LAYER / layer
    share = RECOMPUTE_COST.get(cfg.model.method, 0.5) * recomputed / c.num_hidden_layers
    return parts * (typical * (1 + share) + overhead)


def partial_regroup(cfg, model, lengths, tokens_of, layout: Layout = Layout()) -> tuple[int, int, str]:
    """(micro-batch, accumulation) under partial checkpointing, same sequences per optimizer step: of
    the shapes whose worst micro-batch fits with every layer checkpointed, the one with the cheapest
    estimated step (`step_cost`): larger micro-batches launch less per token but must recompute more
    layers to fit (W512 LoRA at 40 GiB: 16 x 2 +7% over 32 x 1, 8 x 4 -7%)."""
    mbs, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    if ga == 1:
        return mbs, ga, "no accumulation to merge"
    if not sizable(model):
        return mbs, ga, "no model/GPU to size: as configured"
    cap = cfg.data.max_seq_length
    mean = sum(min(n, cap) for n in lengths) / len(lengths) if lengths else cap
    layers, options = model.config.num_hidden_layers, []
    for parts in range(1, ga + 1):
        if ga % parts:
            continue
        m = mbs * ga // parts
        if not fits(cfg, model, True, tokens_of(m), parts, layout)[0]:
            continue
        typical = int(mean * m)
        k = layers_for(checkpoint_table(cfg, model, tokens_of(m), parts, layout), typical)
        options.append((step_cost(cfg, model, parts, typical, k), m, parts, typical, k))
    if not options:
        return mbs, ga, "a larger micro-batch would not fit: as configured"
    _, m, parts, _, _ = best = min(options)
    shown = "; ".join(f"{o[1]} x {o[2]}: ~{o[3]} tokens, {o[4]} of {layers} recomputed" for o in sorted(options, key=lambda o: o[2]))
    return m, parts, f"cheapest estimated step with partial checkpointing ({shown})"


def micro_batch_tokens(cfg, lengths: list[int] | None, multiple: int = 0):
    """micro-batch size -> the most tokens one micro-batch can hold: its `m` longest training
    examples (capped at max_seq_length) when the lengths are known, else m x max_seq_length; with
    `multiple` (plan.pack_multiple) a row of several examples rounded up to it, as data.pack pads it."""
    cap = cfg.data.max_seq_length
    longest = sorted((min(n, cap) for n in lengths or ()), reverse=True)
    most = lambda m: sum(longest[:m]) + max(0, m - len(longest)) * cap  # noqa: E731
    return lambda m: -(-most(m) // multiple) * multiple if multiple and m > 1 else most(m)


def likely_tokens(cfg, lengths: list[int] | None):
    """micro-batch size m -> the most tokens a micro-batch of m examples drawn at random holds, bar a
    ~1-in-30,000 chance (mean x m + 4 standard deviations x sqrt(m)), never above the m longest.
    The memory-lean plan sizes with it: the m longest (W512, m=32: 16.4k tokens) is far from any
    micro-batch a shuffled epoch forms (~10k +- 1k)."""
    worst = micro_batch_tokens(cfg, lengths)
    if not lengths:
        return worst
    xs = [min(n, cfg.data.max_seq_length) for n in lengths]
    mean = sum(xs) / len(xs)
    sd = (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5
    return lambda m: min(worst(m), int(mean * m + 4 * sd * m ** 0.5))


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
