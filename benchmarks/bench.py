"""W512 (and longer) training throughput of llamaft's fast path on one GPU, HF Trainer driven.

    python benchmarks/bench.py DIR MODE SEQ BS GA STEPS OUT.json [--variant fast|plain] [--gc auto|on|off]
        [--compile|--regroup|--offload|--partial|--nf4|--cpu-emb auto|on|off] [--memory-gib N] [--optim NAME]
        DIR   a saved random Llama-3.1-8B-shaped model (`seed_baseline.py save DIR`), or random:SHAPE
              (random:llama-3.1-70b): that shape built on the GPU layer by layer, never saved (onthefly.py);
              under torchrun with --strategy fsdp: built once, by rank 0 in CPU memory, the other ranks on
              meta, and accelerate's cpu_ram_efficient_loading broadcasts it into the FSDP2 shards
        MODE  lora | qlora | full

Same workload as ../shared/bench/seed_baseline.py: identical lengths (lognormal, seed 0), token ids
(seed 1), Trainer sampler seed 0, BS x GA sequences per optimizer step, LoRA r=16 alpha=16 on all
seven projections, lr 1e-4 (full: 1e-5), linear schedule with 1 warm-up step, bf16; the first two
optimizer steps are not timed. Differences, on purpose: lora_dropout 0 (llamaft's default), and the
fast variant's own choices (packing, varlen attention, fused loss, checkpointing only if needed).

--variant plain is the plain HF path (right padding, SDPA, HF loss, no packing) with the SAME model
settings, for per-step loss parity with the fast path.

Real tokens are counted from the batches the model actually receives (a forward pre-hook), not
from an estimate. Memory, three ways: torch.cuda.max_memory_allocated over the whole training (also
split: forward incl. the loss vs backward + optimizer step), max_memory_reserved (the allocator's
cache), and the DEVICE peak: the card's used memory (torch.cuda.mem_get_info, i.e. the driver's
view) sampled every 20 ms from a thread during load and training (train/progress.MemoryPeak), less
what other processes held before this one started (nvidia-smi, e.g. ballast.py emulating a smaller card) -- what decides
whether a run fits a card. Full fine-tuning runs without gradient clipping (max_grad_norm 0) in both
variants: the optimizer in the backward cannot clip, and parity needs the same update.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from llamaft.train.distributed import world  # noqa: E402 - torchrun's RANK / LOCAL_RANK / WORLD_SIZE

PAD = 128004
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lengths(n, seq, seed=0):
    # identical to seed_baseline.lengths: guanaco-like lognormal around ~300 tokens, capped at seq
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.6 + math.log(300))
    return [int(min(seq, max(16, v))) for v in x.tolist()]


def make_rows(n, seq):
    lens = lengths(n, seq)
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128000, (L,), generator=g).tolist()} for L in lens]


def padded_collate(batch):
    # the seed recipe's collator: right padding to the longest, labels -100 on pad
    m = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), m), PAD, dtype=torch.long)
    att = torch.zeros((len(batch), m), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        att[i, : len(b["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": ids.masked_fill(att == 0, -100)}


def run_config(args):
    from llamaft.config import config_from_dict

    return config_from_dict({
        "model": {"name": args.dir, "method": args.mode, "dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": ["<bench>"], "max_seq_length": args.seq, "packing": "auto" if args.variant == "fast" else "off"},
        "train": {"micro_batch_size": args.bs, "gradient_accumulation": args.ga, "gradient_checkpointing": args.gc,
                  "learning_rate": 1e-5 if args.mode == "full" else 1e-4,
                  # our config names the optimizers users choose; torch's fused AdamW is a bench-only extra
                  "optimizer": args.optim if args.optim in ("adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit") else "adamw_torch"},
        "distributed": {"strategy": args.strategy},
        "fast": {"enabled": args.variant == "fast", "compile": args.compile, "regroup_batches": args.regroup,
                 "offload_checkpoints": args.offload, "partial_checkpointing": args.partial,
                 "memory_gib": args.memory_gib, "nf4_kernel": args.nf4, "cpu_embeddings": args.cpu_emb,
                 "pack_multiple": args.pack_multiple},
    }, "bench")


def others_used_bytes() -> int | None:
    """GPU memory in use before this process touches CUDA (other processes: ballast.py), by nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    rank = world().local_rank
    gpu = visible[rank] if len(visible) > rank and visible[rank] else str(rank)
    try:
        out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0]) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def load_model(args):
    sharded = random_fsdp(args)
    if sharded:  # FSDP2: rank 0 whole in CPU memory, the others on meta; accelerate broadcasts into the shards
        import onthefly

        model = onthefly.build_for_rank(args.dir.split(":", 1)[1], world().rank)
    elif args.dir.startswith("random:"):  # benchmark-only: too large to save (70B bf16 is 141 GB)
        import onthefly

        model = onthefly.build(args.dir.split(":", 1)[1], args.mode, "cuda")
    else:
        fsdp = under_fsdp(args)
        # FSDP2 bf16: CPU memory, accelerate moves each shard; QLoRA is quantized on the GPU (as llamaft.train)
        model = _from_disk(args, "cpu" if fsdp and args.mode != "qlora" else torch.cuda.current_device(), fsdp)
    if args.mode != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                 task_type="CAUSAL_LM", target_modules=TARGETS))
    if sharded and world().rank != 0:
        onthefly.trainable_placeholders(model)  # the LoRA weights: CPU storage for accelerate's optimizer mapping
    return model


def under_fsdp(args) -> bool:
    """--strategy fsdp under torchrun (one process: no sharding)."""
    return args.strategy == "fsdp" and world().size > 1


def random_fsdp(args) -> bool:
    """random:SHAPE under torchrun with --strategy fsdp: built once per machine (rank 0), not once per process."""
    fsdp = args.dir.startswith("random:") and under_fsdp(args)
    if fsdp and args.mode == "qlora":
        raise SystemExit("bench.py: random:SHAPE qlora under --strategy fsdp is not built (onthefly quantizes with "
                         "uint8 storage); a saved model's qlora runs under fsdp")
    return fsdp


def _from_disk(args, device, sharded: bool = False):
    """The saved model on `device`; QLoRA with llamaft's BitsAndBytesConfig (model/load.bnb_arguments;
    sharded by FSDP2: the 4-bit weights stored in bf16, so that FSDP can shard them)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llamaft.model.load import bnb_arguments

    kw = dict(dtype=torch.bfloat16, device_map={"": device}, attn_implementation="sdpa")
    if args.mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(**bnb_arguments(run_config(args).quantization, sharded))
    return AutoModelForCausalLM.from_pretrained(args.dir, **kw)


def versions(names=("torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton")) -> dict:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    out["cuda"] = torch.version.cuda
    return out


def dynamo_counters():
    # graph breaks and recompiles of the compiled blocks (an unnoticed break costs most of compile's gain)
    from torch._dynamo.utils import counters

    return {k: {str(kk): vv for kk, vv in list(v.items())[:20]} for k, v in counters.items() if k in ("graph_break", "stats", "recompiles")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("dir"); ap.add_argument("mode", choices=["lora", "qlora", "full"])
    ap.add_argument("seq", type=int); ap.add_argument("bs", type=int); ap.add_argument("ga", type=int)
    ap.add_argument("steps", type=int); ap.add_argument("out")
    ap.add_argument("--variant", choices=["fast", "plain"], default="fast")
    ap.add_argument("--gc", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--regroup", choices=["auto", "off"], default="auto")
    ap.add_argument("--offload", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--partial", choices=["auto", "off"], default="auto")
    ap.add_argument("--memory-gib", type=float, default=None, help="fast.memory_gib: the plan's memory budget")
    ap.add_argument("--nf4", choices=["auto", "off"], default="auto")
    ap.add_argument("--cpu-emb", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--pack-multiple", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="fast.pack_multiple: packed rows padded to a multiple of this many tokens (0: off)")
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                    help="under torchrun: DDP, or FSDP2 as llamaft.train runs it (train/fsdp.py; qlora: 4-bit weights stored in bf16)")
    ap.add_argument("--optim", default=None, help="default: adamw_torch (lora), paged_adamw_8bit (qlora, full)")
    ap.add_argument("--fixed-len", type=int, default=0, help="every sequence this long (seq 2048/8192 workloads)")
    ap.add_argument("--profile", action="store_true",
                    help="one extra optimizer step after the timed ones under torch.profiler: kernel time by kind "
                         "and where the GPU waited (trace_gaps.py); env BENCH_TRACE=FILE.json.gz keeps the chrome trace")
    args = ap.parse_args(argv)
    # full: paged 8-bit AdamW, as the seed recipe and Unsloth were measured (../shared/bench)
    args.optim = args.optim or {"lora": "adamw_torch", "qlora": "paged_adamw_8bit", "full": "paged_adamw_8bit"}[args.mode]
    return args


# Dense bf16 tensor-core peak per GPU (NVIDIA's datasheet, without sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
MFU_FORMULA = ("model FLOPs per token = k*N + 6*L*h*n (k = 4 for LoRA / QLoRA: forward + input gradients, the frozen "
               "base has no weight gradients; k = 6 for full fine-tuning; N = the decoder's and lm_head's matrix "
               "weights; attention 6*L*h*n with n = the token-weighted mean sequence length, causal); recomputation "
               "not counted (model FLOPs, not hardware FLOPs); MFU = that x tokens/s / (GPUs x dense bf16 peak)")


def model_flops_per_token(config, mode: str, lengths: list[int]) -> float:
    """MFU_FORMULA's model FLOPs per trained token, from the model's config and the sequence lengths."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kvh = h // config.num_attention_heads * getattr(config, "num_key_value_heads", config.num_attention_heads)
    matrices = layers * (h * (2 * h + 2 * kvh) + 3 * h * i) + v * h
    n = sum(x * x for x in lengths) / max(sum(lengths), 1)
    return (6 if mode == "full" else 4) * matrices + 6 * layers * h * n


def mfu(flops_per_token: float, tokens_per_s: float, gpus: int, device_name: str) -> float | None:
    peak = next((f for k, f in PEAK_BF16_FLOPS.items() if k in device_name), None)
    return None if peak is None else round(flops_per_token * tokens_per_s / (gpus * peak), 4)


def workload(args):
    n = args.bs * args.ga * (args.steps + 2 + args.profile) * world().size  # BS x GA sequences per GPU and step
    if not args.fixed_len:
        return make_rows(n, args.seq)
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128000, (args.fixed_len,), generator=g).tolist()} for _ in range(n)]


def prepare(args, cfg, model, rows):
    """(model, collate, plan, micro-batch, accumulation): the fast variant exactly as llamaft.train
    sets it up (the plan installed, its collator, `resolve_steps` for the batch shape and torch's
    fused AdamW); the plain variant: padding, HF's checkpointing where the plan would checkpoint."""
    from llamaft.model.fast import apply_fast_path, choose_plan, make_collator
    from llamaft.train.setup import resolve_steps

    plan = choose_plan(cfg, model, [len(r["input_ids"]) for r in rows])
    if args.variant == "plain":
        if plan.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, padded_collate, plan, args.bs, args.ga
    steps = resolve_steps(cfg.train, plan)  # same 32 sequences per optimizer step, maybe regrouped
    if args.optim in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit"):  # our config's names: as train resolves them
        args.optim = steps.optim  # (other --optim names are passed to HF as given)
    # unpacked rows keep the seed recipe's padding (these rows carry no labels for data.collate)
    collate = make_collator(plan, PAD) if plan.packing else padded_collate
    return apply_fast_path(model, plan), collate, plan, steps.micro_batch_size, steps.gradient_accumulation


def meters(model, pad_id=None):
    """Forward hooks: real / computed tokens the model sees, and peak memory by phase (forward incl.
    the fused loss vs backward + optimizer step). Real tokens as llamaft.train counts them (its
    batch_tokens): `pad_id` given (plan.pack_multiple), a packed row's pad segment is not real."""
    from llamaft.train.progress import batch_tokens

    seen, phase = {"real": 0, "computed": 0}, {"fwd": 0, "bwd": 0}

    def count(_module, _args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None:
            seen["real"] += int(batch_tokens(kwargs, pad_id))
            seen["computed"] += ids.numel()

    def mark(name):
        def hook(*_):
            phase[name] = max(phase[name], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        return hook

    model.register_forward_pre_hook(count, with_kwargs=True)
    model.register_forward_pre_hook(mark("bwd"))  # at a forward's start: the peak since the last one's end
    model.register_forward_hook(mark("fwd"))
    return seen, phase


def plan_record(args, plan):
    if args.variant != "fast":
        return dict(packing=False, attention="sdpa", fused_loss=False, gradient_checkpointing=plan.gradient_checkpointing)
    return dict(packing=plan.packing, attention=plan.attention, fused_loss=plan.fused_loss,
                gradient_checkpointing=plan.gradient_checkpointing, compile=plan.compile,
                offload_checkpoints=plan.offload_checkpoints, fused_optimizer=plan.fused_optimizer,
                checkpoint_layers=plan.checkpoint_layers, nf4_kernel=plan.nf4_kernel,
                cpu_embeddings=plan.cpu_embeddings, cpu_lm_head=plan.cpu_lm_head, lean=plan.lean,
                optimizer_in_backward=plan.optimizer_in_backward, unpaged_optimizer=plan.unpaged_optimizer,
                pack_multiple=plan.pack_multiple,
                budget_device_gib=None if plan.budget is None else round(plan.budget.device_bytes / 2**30, 2),
                budget_cap_gib=None if plan.budget is None else round(plan.budget.cap_bytes / 2**30, 2),
                reasons=list(plan.reasons))


def main():
    args = parse_args()
    if world().size > 1:  # torchrun: one GPU per process; the Trainer runs DDP (llamaft's plan for several processes)
        torch.cuda.set_device(world().local_rank)
    others = others_used_bytes()  # before this process holds any CUDA memory
    if args.variant == "fast":
        from llamaft.model.fast import configure_allocator

        configure_allocator()  # what llamaft.train does before loading (expandable segments)
    from llamaft.train.progress import MemoryPeak

    device = MemoryPeak("cuda", interval=0.02)  # the driver's view, sampled from a thread, as training reports it
    device.start()
    try:
        run, stamps, phase, trainer, load_s = train(args)
    finally:
        device.stop()
    write_result(args, run, stamps, phase, trainer, load_s, device.peak_bytes, others)


def train(args):
    from transformers import TrainerCallback, TrainingArguments

    from llamaft.train.checkpoint import AtomicCheckpointTrainer as Trainer  # llamaft's (per-step guard included)

    torch.manual_seed(0)
    cfg = run_config(args)
    t0 = time.time()
    model = load_model(args)
    load_s = time.time() - t0
    rows = workload(args)
    model, collate, plan, bs, ga = prepare(args, cfg, model, rows)
    print("plan:", plan, flush=True)
    seen, phase = meters(model, PAD if plan.pack_multiple else None)  # PAD never occurs in make_rows' ids
    stamps = []

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            torch.cuda.synchronize()
            stamps.append((time.time(), seen["real"], seen["computed"]))

    in_backward = args.variant == "fast" and plan.optimizer_in_backward
    targs = TrainingArguments(
        output_dir=f"/tmp/bench_{args.mode}_{args.variant}", per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga, optim=args.optim, learning_rate=cfg.train.learning_rate,
        bf16=True, max_steps=args.steps + 2 + args.profile, logging_steps=1, save_strategy="no", report_to=[],
        warmup_steps=1, lr_scheduler_type="linear", dataloader_drop_last=True,
        remove_unused_columns=False, seed=0, max_grad_norm=0.0 if args.mode == "full" else 1.0,
        logging_nan_inf_filter=False,  # as llamaft.train: its non-finite guard checks each step instead
        # as llamaft.train (train/setup.py): DDP without HF's per-step search for unused weights
        ddp_find_unused_parameters=False,
        **fsdp_arguments(args, cfg))
    optimizers = (in_backward_optimizer(model, targs), None) if in_backward else (None, None)
    prof_out = {}
    callbacks = [Clock()] + ([step_profile(args.steps + 2, prof_out)] if args.profile else [])
    tr = Trainer(model=model, args=targs, train_dataset=DS(), data_collator=collate, callbacks=callbacks,
                 optimizers=optimizers)
    torch.cuda.reset_peak_memory_stats()
    tr.train()
    phase["bwd"] = max(phase["bwd"], torch.cuda.max_memory_allocated())
    phase["reserved"] = torch.cuda.max_memory_reserved()
    run = dict(micro_batch_run=bs, accumulation_run=ga, plan=plan_record(args, plan), profile=prof_out.get("profile"),
               config=model.config, lengths=[min(len(r["input_ids"]), args.seq) for r in rows])
    return run, stamps, phase, tr, load_s


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind, by its name: where a step's GPU time goes."""
    n = name.lower()
    for kind, keys in (("comm", ("nccl",)), ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "sm100")),
                       ("attention", ("flash", "fmha", "attn")), ("triton", ("triton",)),
                       ("copy", ("memcpy", "memset", "copy")), ("reduce", ("reduce",)),
                       ("elementwise", ("elementwise",)), ("optimizer", ("adam", "multi_tensor"))):
        if any(k in n for k in keys):
            return kind
    return "other"


def step_profile(at, out):
    """A Trainer callback: torch.profiler around optimizer step `at` (0-based); into out["profile"]: the
    step's wall time, GPU kernel time by kind (gemm / attention / triton / ...) and the 25 costliest
    kernels. Wall minus kernel time is where the GPU waited (launches, host work, synchronisation)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class StepProfile(TrainerCallback):
        prof, t0 = None, 0.0

        def on_step_begin(self, a, state, control, **k):
            if state.global_step == at and self.prof is None and "profile" not in out:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.time()

        def on_step_end(self, a, state, control, **k):
            if self.prof is not None:
                torch.cuda.synchronize()
                wall = time.time() - self.t0
                self.prof.__exit__(None, None, None)
                out["profile"] = summarize_profile(self.prof, at, wall)
                out["profile"]["timeline"] = timeline(self.prof)
                self.prof = None

    return StepProfile()


def timeline(prof) -> dict:
    """trace_gaps.py's reading of the step's chrome trace: compute idle time by culprit, and how much of
    the host copies hid behind compute. BENCH_TRACE=FILE.json.gz keeps the trace (chrome://tracing)."""
    import gzip
    import shutil
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trace_gaps

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        summary = trace_gaps.summarize(trace_gaps.load(path))
        if os.environ.get("BENCH_TRACE"):
            with open(path, "rb") as src, gzip.open(os.environ["BENCH_TRACE"], "wb") as dst:
                shutil.copyfileobj(src, dst)
    return summary


def summarize_profile(prof, at, wall):
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind, by_name = {}, {}
    for e in kernels:
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0) + us
        n, c = by_name.get(e.name, (0, 0))
        by_name[e.name] = (n + us, c + 1)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return dict(step=at, wall_ms=round(wall * 1e3, 1), kernel_ms=round(sum(by_kind.values()) / 1e3, 1),
                kernels=len(kernels),
                by_kind_ms={k: round(v / 1e3, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                top=[dict(name=n[:120], ms=round(us / 1e3, 2), calls=c) for n, (us, c) in top])


def fsdp_arguments(args, cfg) -> dict:
    """TrainingArguments' FSDP2 fields as llamaft.train sets them (train/fsdp.py), under torchrun with
    --strategy fsdp; none otherwise (DDP is the Trainer's default for several processes). random:SHAPE adds
    accelerate's cpu_ram_efficient_loading: only rank 0 holds the weights (`load_model`), broadcast into
    every rank's shards by fsdp2_prepare_model."""
    if not under_fsdp(args):
        return {}
    from llamaft.train.fsdp import trainer_arguments

    out = trainer_arguments(cfg, "fsdp")
    if args.dir.startswith("random:"):
        out["fsdp_config"] = {**out["fsdp_config"], "cpu_ram_efficient_loading": True}
    return out


def in_backward_optimizer(model, targs):
    """The optimizer llamaft.train builds when the plan steps it in the backward (train/in_backward.py)."""
    from llamaft.train.in_backward import in_backward_optimizer as build

    return build(model, targs)


def across_ranks(real, computed, device_peak, phase):
    """Tokens summed over the processes, memory peaks their largest (one process: as given)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return real, computed, device_peak, phase["fwd"], phase["bwd"]
    total = torch.tensor([real, computed], dtype=torch.float64, device="cuda")
    peaks = torch.tensor([device_peak, phase["fwd"], phase["bwd"]], dtype=torch.float64, device="cuda")
    dist.all_reduce(total)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return int(total[0]), int(total[1]), int(peaks[0]), int(peaks[1]), int(peaks[2])


def write_result(args, run, stamps, phase, trainer, load_s, device_peak, others):
    free, total = torch.cuda.mem_get_info()
    # the profiled step (last, slowed by the profiler) is not timed
    (t1, r1, c1), (t2, r2, c2) = stamps[1], stamps[-1 - bool(args.profile)]
    gib = 2**30
    rank, n = world().rank, world().size
    # several processes: tokens summed over them, peaks the largest of them
    real, computed, net_peak, fwd, bwd = across_ranks(r2 - r1, c2 - c1, device_peak - (others or 0), phase)
    res = dict(
        mode=args.mode, variant=args.variant, seq=args.seq, bs=args.bs, ga=args.ga, steps=args.steps,
        micro_batch_run=run["micro_batch_run"], accumulation_run=run["accumulation_run"],
        fixed_len=args.fixed_len, optimizer=args.optim, lora_dropout=0.0 if args.mode != "full" else None,
        plan=run["plan"], profile=run.get("profile"),
        timed_steps=len(stamps) - 2, timed_s=round(t2 - t1, 3), timed_real_tokens=real,
        timed_computed_tokens=computed, tokens_per_s=round(real / (t2 - t1), 1),
        computed_tokens_per_s=round(computed / (t2 - t1), 1), load_s=round(load_s, 1),
        peak_mem_gib=round(max(fwd, bwd) / gib, 2), peak_fwd_gib=round(fwd / gib, 2), peak_bwd_step_gib=round(bwd / gib, 2),
        peak_reserved_gib=round(phase["reserved"] / gib, 2),
        # the card's used memory at its peak (sampled), less what other processes held before this one
        device_peak_gib=round(net_peak / gib, 2),
        others_before_gib=None if others is None else round(others / gib, 2),
        device_used_gib_end=round((total - free) / gib, 2),
        losses=[h.get("loss") for h in trainer.state.log_history if "loss" in h],
        device=torch.cuda.get_device_name(0), versions=versions(), dynamo=dynamo_counters(),
        command="python " + " ".join(sys.argv))
    res.update(world_size=n, tokens_per_s_per_gpu=round(res["tokens_per_s"] / n, 1))
    flops = model_flops_per_token(run["config"], args.mode, run["lengths"])
    res.update(model_flops_per_token=round(flops), mfu=mfu(flops, res["tokens_per_s"], n, res["device"]),
               mfu_formula=MFU_FORMULA)
    if rank != 0:
        return
    print(json.dumps(res), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
