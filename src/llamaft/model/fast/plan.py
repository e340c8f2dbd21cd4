"""What the fast path does for one run, decided once: `choose_plan(cfg, model, lengths) -> FastPlan`.

    plan = choose_plan(cfg, model, [len(ex.input_ids) for ex in train])
    print("\\n".join(plan.reasons))    # what summary.json records as `fast_path`

Each decision is a small function returning `(value, reason)` (reason None: nothing to log), fed
only with the config, the facts read once by `read_facts` (device, attention kernels, launch, what
the model allows) and earlier decisions, so each one can be tested alone. `choose_plan` runs them in
the order their reasons are logged and freezes the result: installing it (install.py) never changes
it. An explicit `on`/`off` in the config always wins over `auto`; numbers that came from measurements
name the benchmark they came from (benchmarks/README.md, benchmarks/results/*.json).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from . import attention as _attention
from . import memory as _memory
from .plan_memory import (  # the memory deciders live in plan_memory.py; re-exported here
    MLP_CHUNK_ROWS, QLORA_MICRO_BATCH_TOKENS, TILE_MLP_ROWS, checkpointing, deferred_mlp, lean_memory, memory_budget,
    micro_batches, offload_checkpoints, optimizer_in_backward, own_checkpointing, partial_checkpointing, tile_mlp,
    unpaged_optimizer, widest_mlp_chunks,
)

__all__ = ["FastPlan", "Facts", "ModelFits", "choose_plan", "read_facts",
           # from plan_memory.py
           "MLP_CHUNK_ROWS", "QLORA_MICRO_BATCH_TOKENS", "TILE_MLP_ROWS", "checkpointing", "deferred_mlp", "lean_memory",
           "memory_budget", "micro_batches", "offload_checkpoints", "optimizer_in_backward", "own_checkpointing",
           "partial_checkpointing", "tile_mlp", "unpaged_optimizer", "widest_mlp_chunks"]

# The memory-lean plan's (QLoRA's) fused loss chunk: 256 rows x 128,256 vocab x 6 bytes = 188 MiB live,
# instead of ~0.8 GiB at the default ~1,046 rows, out of a ~7 GiB budget. A memory choice, not timed on its own.
QLORA_LOSS_CHUNK_ROWS = 256
# torch.compile measured to win: W512 LoRA without checkpointing +8% (run7_w512_lora_fast_compile.json
# vs run6_w512_lora_fast.json); QLoRA +28% / +33% at 8 x 4 / 16 x 2 (launch-bound; run9_w512_qlora_fast.json
# -> run11_w512_qlora_fast_compile.json, run10_w512_qlora_fast_bs16.json -> run11_..._bs16_compile.json); full 32 x 1 with partial checkpointing +17% (7,907 vs
# 6,763 tok/s, run19_w512_full40c.json vs run19_w512_full40.json). Checkpointed LoRA was not measured.
COMPILE_MEASURED_FOR = ("qlora", "full")


@dataclass(frozen=True)
class FastPlan:
    """The decisions for one run, each beside the reason line it was logged with."""

    packing: bool                 # padding-free rows (data.pack.PackedCollator) + varlen/flex attention
    attention: str                # "varlen" | "flex" | "reference" | "sdpa" | "eager": what install_attention sets
    fused_loss: bool              # chunked lm_head + cross-entropy, full logits never materialised
    gradient_checkpointing: bool  # recompute activations (only when the estimate says memory is short)
    compile: bool                 # torch.compile of decoder blocks
    reasons: tuple[str, ...] = ()  # one line per decision, logged by train/ and kept in summary.json
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
    checkpoint_tokens: tuple[int, ...] | None = None
    checkpoint_layers: int | None = None      # N for the largest micro-batch the data can form (reported)
    cpu_lm_head: bool = False                 # frozen lm_head parked in CPU memory between losses (head.py)
    nf4_kernel: bool = False                  # QLoRA: NF4 base + LoRA as one op (lora_nf4.py, nf4.py)
    budget: _memory.Budget | None = None      # the device-level memory budget; install caps the allocator at it
    lean: bool = False                        # weights, checkpoints and batches chosen for a small budget
    unpaged_optimizer: bool = False           # paged_adamw_8bit runs unpaged: its states inside the budget
    optimizer_in_backward: bool = False       # full: each parameter stepped as its gradient completes (train/in_backward.py)
    mlp_chunk_rows: int = 0                   # > 0: recomputed layers' MLPs deferred to the backward, in chunks (recompute.defer_mlp)
    pack_multiple: int = 0                    # > 0: packed rows of several examples padded to a multiple of it (data.pack)

    def __post_init__(self):
        # frozen all the way down: lists given by callers become tuples
        object.__setattr__(self, "reasons", tuple(self.reasons))
        if self.checkpoint_tokens is not None:
            object.__setattr__(self, "checkpoint_tokens", tuple(self.checkpoint_tokens))

    @property
    def checkpointing(self) -> str:
        """"none" | "hf" (HF's non-reentrant) | "own" (every layer) | "partial" (layers per micro-batch)."""
        if not self.gradient_checkpointing:
            return "none"
        if not self.own_checkpointing:
            return "hf"
        return "partial" if self.checkpoint_tokens is not None else "own"


@dataclass(frozen=True)
class ModelFits:
    """What the model allows, from each piece's own eligibility test (install.model_fits). None: not
    known (no model, or a sizing stand-in with only a config and parameters): the config decides."""

    layers: bool | None = None       # a decoder layer list: own checkpointing, MLP tiles, compile
    embeddings: bool | None = None   # a frozen, untied nn.Embedding: may live in CPU memory
    fused_loss: bool | None = None   # a plain bias-free nn.Linear lm_head over a `model` decoder
    park_head: bool | None = None    # that head frozen, untied, on CUDA, with layers to prefetch from


@dataclass(frozen=True)
class Facts:
    """What the plan reads from outside the config, read once (tests build it directly)."""

    cuda: bool                         # the model trains on a CUDA device
    packed_kernel: str | None = None   # best packed attention kernel on this torch/GPU (attention.py)
    distributed: bool = False          # several processes (WORLD_SIZE > 1)
    fits: ModelFits = field(default_factory=ModelFits)
    budget: _memory.Budget | None = None  # this run's share of the card (memory.read_budget), None off CUDA
    fsdp: bool = False                 # several processes under FSDP2 (distributed.strategy=fsdp, train/fsdp.py)


def read_facts(cfg, model) -> Facts:
    """The device, the kernels and the launch, and what `model` allows; the attention kernels are
    probed only where the fast path runs."""
    from .install import model_fits

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    fsdp = distributed and cfg.distributed.strategy == "fsdp"
    # under FSDP the model waits in CPU memory until fully_shard moves each process's shard to its GPU
    cuda = _cuda_target(model) or (fsdp and torch.cuda.is_available())
    fast = cuda and cfg.fast.enabled
    kernel = _attention.best_packed_attention() if fast else None
    return Facts(cuda=cuda, packed_kernel=kernel, distributed=distributed, fits=model_fits(model),
                 budget=_memory.read_budget(cfg) if fast and not fsdp else None, fsdp=fsdp)


def _cuda_target(model) -> bool:
    """The model is (or, on the meta device / not given, will be) on a CUDA device."""
    from .install import model_device

    dev = model_device(model)
    if dev is not None and dev.type == "meta":  # not placed yet: decide for where it will go
        dev = None
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda")


class _Log:
    """Takes a decider's (value, reason), keeps the reason line, hands back the value."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, decided):
        value, reason = decided
        if reason:
            self.lines.append(reason)
        return value


def choose_plan(cfg, model=None, lengths: list[int] | None = None, facts: Facts | None = None) -> FastPlan:
    """The plan for `cfg` on `model` (a HF model, a sizing stand-in, or None). `lengths`: token
    counts of the training examples; with packing they bound a micro-batch's tokens far better than
    micro_batch_size x max_seq_length (memory estimates). `facts`: read from the model and the
    machine when not given."""
    facts = facts if facts is not None else read_facts(cfg, model)
    log = _Log()
    if not log(fast_path(cfg, facts)):
        packing, attention = log(plain_packing(cfg))
        multiple = log(pack_multiple(cfg, packing))
        gc = log(plain_checkpointing(cfg))
        return FastPlan(packing, attention, False, gc, False, tuple(log.lines), pack_multiple=multiple)
    if facts.fsdp:
        return _fsdp_plan(cfg, facts, log)
    return _fast_plan(cfg, model, lengths, facts, log)


# What FSDP2 keeps of the fast path: what works on the batch and inside attention, never on a weight.
FSDP_OFF = ("fast path under FSDP2: packing and the attention kernel kept; off: the fused loss and the parked "
            "lm_head (they read the lm_head's weight outside its FSDP unit, where it is a shard), CPU embeddings "
            "(FSDP owns where each weight lives), our own checkpointing and offload (FSDP's activation "
            "checkpointing, distributed.fsdp.activation_checkpointing), fused LoRA / NF4 kernels and torch.compile "
            "(not validated on sharded weights), the memory budget and micro-batch regrouping (the estimate "
            "knows no sharding), torch's fused AdamW (its step over DTensor shards is not validated)")


def _fsdp_plan(cfg, facts: Facts, log: _Log) -> FastPlan:
    attention = log(attention_kernel(cfg, facts.packed_kernel))
    packing = log(packing_mode(cfg, attention))
    multiple = log(pack_multiple(cfg, packing))
    single = log(single_sequence_sdpa(cfg, attention))
    log((None, FSDP_OFF))
    return FastPlan(packing, attention, False, False, False, tuple(log.lines), single_sdpa=single,
                    pack_multiple=multiple)


def _fast_plan(cfg, model, lengths, facts: Facts, log: _Log) -> FastPlan:
    attention = log(attention_kernel(cfg, facts.packed_kernel))
    packing = log(packing_mode(cfg, attention))
    multiple = log(pack_multiple(cfg, packing))
    fused = log(fused_loss(cfg))
    log(memory_budget(facts.budget))
    tokens_of = _memory.micro_batch_tokens(cfg, lengths if packing else None, multiple)
    gc = log(checkpointing(cfg, model, tokens_of(cfg.train.micro_batch_size)))
    own = log(own_checkpointing(gc, facts.distributed))
    lean = log(lean_memory(cfg, model, own, tokens_of))
    offload = log(offload_checkpoints(cfg, own, lean))
    cpu_emb = log(cpu_embeddings(cfg, lean))
    cpu_head = log(cpu_lm_head(cfg, fused, lean))
    unpaged = log(unpaged_optimizer(cfg))
    in_bwd = log(optimizer_in_backward(cfg, model, own, tokens_of, facts.distributed))
    mlp_rows = log(deferred_mlp(cfg, own, lean, in_bwd))
    loss_rows = loss_chunk_rows(lean)[0]
    layout = _memory.Layout(offload, cpu_emb, cpu_head, in_bwd, mlp_rows, loss_rows)
    mbs, ga = log(micro_batches(cfg, model, lengths, tokens_of, packing, gc, own, lean, layout))
    layout = replace(layout, mlp_rows=widest_mlp_chunks(cfg, model, lengths, mbs, ga, layout))
    table, layers = log(partial_checkpointing(cfg, model, own, tokens_of(mbs), ga, lean, layout))
    fused_opt = log(fused_optimizer(cfg))
    comp = log(compile_blocks(cfg, gc, lean, own))
    lora = log(fused_lora(model))
    nf4 = log(nf4_kernel(cfg))
    single = log(single_sequence_sdpa(cfg, attention))
    tile = log(tile_mlp(cfg, layout.mlp_rows))
    # what this model allows comes last (its lines close the list), so nothing changes after freezing
    cpu_emb = log(embeddings_fit(cpu_emb, facts.fits))
    fused = log(fused_loss_fits(fused, facts.fits))
    cpu_head = log(lm_head_fits(cpu_head, fused, facts.fits))
    own, offload = log(layers_fit(own, offload, facts.fits))
    return FastPlan(packing, attention, fused, gc, comp, tuple(log.lines), fused_lora=lora, own_checkpointing=own,
                    offload_checkpoints=offload, micro_batch_size=mbs, gradient_accumulation=ga,
                    fused_optimizer=fused_opt, tile_mlp_rows=tile, single_sdpa=single, cpu_embeddings=cpu_emb,
                    cpu_lm_head=cpu_head, nf4_kernel=nf4, checkpoint_layers=layers, checkpoint_tokens=table,
                    loss_chunk_rows=loss_rows, budget=facts.budget, lean=lean,
                    unpaged_optimizer=unpaged, optimizer_in_backward=in_bwd, mlp_chunk_rows=layout.mlp_rows,
                    pack_multiple=multiple)


# ---- the path: fast on CUDA unless switched off; the plain path's own two decisions
def fast_path(cfg, facts: Facts):
    if cfg.fast.enabled and facts.cuda:
        return True, None
    why = "fast.enabled=false" if not cfg.fast.enabled else "no CUDA device"
    return False, f"fast path off ({why}): plain HF model, SDPA attention, right padding"


def plain_packing(cfg):
    """(packing, attention) off the fast path: an explicit data.packing=on still works."""
    f = cfg.fast
    if cfg.data.packing != "on":
        return (False, "sdpa" if f.attention == "auto" else f.attention), None
    # HF's SDPA reads packed position_ids but does not isolate the examples: our per-example reference does
    attention = "reference" if f.attention in ("auto", "sdpa") else f.attention
    return (True, attention), "packing on (data.packing=on): per-example reference attention (correct, not fast)"


def plain_checkpointing(cfg):
    gc_cfg = cfg.train.gradient_checkpointing
    gc = gc_cfg == "on"
    return gc, f"gradient checkpointing {'on' if gc else 'off'} (train.gradient_checkpointing={gc_cfg})"


# ---- attention, packing, loss
def attention_kernel(cfg, packed_kernel: str | None):
    """auto: the best kernel for packed rows ("varlen" on torch >= 2.10 + sm80, else "flex"), else SDPA."""
    if cfg.fast.attention != "auto":
        return cfg.fast.attention, f"attention {cfg.fast.attention} (fast.attention)"
    attention = packed_kernel or "sdpa"
    return attention, f"attention {attention} (auto: best packed kernel on this torch/GPU)"


def packing_mode(cfg, attention: str):
    """Packed rows need a kernel that respects example boundaries: auto packs with varlen / flex."""
    mode = cfg.data.packing
    if mode == "off":
        return False, "packing off (data.packing=off)"
    if mode == "on" or attention in ("varlen", "flex"):
        return True, f"packing on ({'data.packing=on' if mode == 'on' else 'auto'}): no pad tokens between examples"
    return False, f"packing off (auto: attention {attention} has no varlen path here)"


def pack_multiple(cfg, packing: bool):
    """Packed rows of several examples padded to a multiple of N tokens (data.pack.flatten), so a run
    meets a few row lengths (GEMM shapes) instead of a new one per micro-batch. Opt-in: auto pads
    nothing. Why it was built: eager aten::mm spent 3-22 ms on the host per new shape (95 ms of an 836
    ms H200 step idle; bench.py --profile, benchmarks/README.md session 8). Measured (H200, W512 LoRA
    at 18 GiB, 10 steps, one call: benchmarks/results/budget_h200_pack/): 256 gave 10,763 real tok/s
    against 10,831 unpadded, with 1.1% pad tokens computed: no gain in a short run. Longer runs meet
    each row length more often; not measured."""
    setting = cfg.fast.pack_multiple
    if not packing or setting in ("auto", 0):
        return 0, (None if setting == "auto" or not packing else
                   "packed rows not padded (fast.pack_multiple=0): one GEMM shape per row length")
    return setting, (f"packed rows padded to a multiple of {setting} tokens (fast.pack_multiple={setting}): few "
                     f"distinct GEMM shapes; <= {setting - 1} pad tokens per micro-batch")


def fused_loss(cfg):
    on = cfg.fast.fused_loss != "off"
    return on, f"fused loss {'on' if on else 'off'} (fast.fused_loss={cfg.fast.fused_loss})"


def loss_chunk_rows(lean: bool):
    """Rows per fused-loss chunk (None: ~512 MiB of fp32 logits, loss.py); not logged."""
    return (QLORA_LOSS_CHUNK_ROWS if lean else None), None


def single_sequence_sdpa(cfg, attention: str):
    """A varlen row holding one example runs causal SDPA (cuDNN: 7.2 s vs 12.2 s per 32k-token QLoRA
    step, run10_maxlen_attn_32k.json); logged only where varlen runs."""
    on = cfg.fast.single_sequence_sdpa != "off"
    if attention != "varlen":
        return on, None
    how = "causal SDPA (cuDNN where available)" if on else "varlen"
    return on, f"rows holding one example: {how} (fast.single_sequence_sdpa={cfg.fast.single_sequence_sdpa})"


# ---- kernels and where frozen weights live
def fused_optimizer(cfg):
    """adamw_torch as torch's fused AdamW: one kernel per step instead of one per tensor."""
    if cfg.train.optimizer != "adamw_torch":
        return False, None
    on = cfg.fast.fused_optimizer != "off"
    return on, f"torch fused AdamW {'on' if on else 'off'} (fast.fused_optimizer={cfg.fast.fused_optimizer})"


def compile_blocks(cfg, gc: bool, lean: bool = False, own: bool = False):
    """torch.compile of the decoder layers (~60-90 s of compilation); auto: where it was measured to
    win (the memory-lean lora plan is qlora's, bf16 weights instead of NF4; lora under our own
    checkpointing is full fine-tuning's partial plan, where compile measured +17%)."""
    setting, method = cfg.fast.compile, cfg.model.method
    if setting != "auto":
        on = setting == "on"
        return on, f"torch.compile {'on' if on else 'off'} (fast.compile={setting})"
    on = (method == "lora" and (not gc or own)) or method in COMPILE_MEASURED_FOR or lean
    why = "measured to win here" if on else "only measured to win for qlora, full, and lora without HF's checkpointing"
    return on, f"torch.compile {'on' if on else 'off'} (auto: {why})"


def fused_lora(model=None):
    """PEFT's LoRA linears as our fused GEMMs (lora.py); ineligible layers keep PEFT's forward: all of
    them under two stacked adapters (model.from_run: stack; lora.py fuses one adapter per layer)."""
    from ..adapters import is_stacked

    if is_stacked(model):
        return False, "fused LoRA linears off: two adapters stacked (model.from_run: stack) run PEFT's forward"
    return True, "fused LoRA linears on (fast path): scale and add inside the GEMMs"


def nf4_kernel(cfg):
    """QLoRA: NF4 base + LoRA as one opaque op (lora_nf4.py); 0.78 GiB of dequantised weights less
    at the peak than bitsandbytes' path (run20 vs run22 memory_peak JSON)."""
    if cfg.model.method != "qlora":
        return False, None
    on = cfg.fast.nf4_kernel != "off"
    how = "one op: one-pass Triton dequant + base and LoRA GEMMs" if on else "bitsandbytes forward"
    return on, f"NF4 base layers: {how} (fast.nf4_kernel={cfg.fast.nf4_kernel})"


def cpu_embeddings(cfg, lean: bool = False):
    """The frozen input embedding table in CPU memory (auto: memory-lean, ~1 GiB of qlora's ~7 on 8B;
    no measurable cost: run17_w512_qlora_fast.json vs run18_w512_qemboff.json)."""
    setting = cfg.fast.cpu_embeddings
    on = setting == "on" or (setting == "auto" and lean)
    where = "in CPU memory when frozen and untied" if on else "on the GPU"
    return on, f"input embeddings {where} (fast.cpu_embeddings={setting})"


def cpu_lm_head(cfg, fused: bool, lean: bool = False):
    """A frozen lm_head parked in CPU memory between losses (auto: memory-lean; QLoRA 32 x 1 8.09 ->
    7.11 GiB, run18_w512_qlora32.json -> run19_w512_qlora32p.json). Only with the fused loss, the one
    place that reads it."""
    setting = cfg.fast.cpu_lm_head
    on = fused and (setting == "on" or (setting == "auto" and lean))
    where = "parked in CPU memory between losses when frozen and untied" if on else "on the GPU"
    return on, f"lm_head {where} (fast.cpu_lm_head={setting})"


# ---- what the model allows (ModelFits); None = unknown, the decision stands
def embeddings_fit(want: bool, fits: ModelFits):
    if want and fits.embeddings is False:
        return False, "input embeddings stay on the GPU: trained, tied to the lm_head, or not a plain nn.Embedding"
    return want, None


def fused_loss_fits(want: bool, fits: ModelFits):
    if want and fits.fused_loss is False:
        return False, "fused loss off: lm_head is not a plain bias-free nn.Linear"
    return want, None


def lm_head_fits(want: bool, fused: bool, fits: ModelFits):
    if want and (not fused or fits.park_head is False):
        return False, "lm_head stays on the GPU: trained, tied to the input embeddings, or not on CUDA"
    return want, None


def layers_fit(own: bool, offload: bool, fits: ModelFits):
    """No decoder layer list to wrap: HF's checkpointing instead of ours (not logged: every HF Llama has one)."""
    if own and fits.layers is False:
        return (False, False), None
    return (own, offload), None
