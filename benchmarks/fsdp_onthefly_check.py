"""bench.py's `random:SHAPE --strategy fsdp` loading path, checked in several processes (CPU over gloo, or GPUs):

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_onthefly_check.py [SHAPE] [--steps N] [--gc on] [--all-meta]

The model is made exactly as bench.py makes it (bench.load_model: rank 0 the whole random model in CPU
memory, the other ranks on the meta device, LoRA attached on both) and trained by llamaft's Trainer with
bench.fsdp_arguments (accelerate's FSDP2 + cpu_ram_efficient_loading). Checked on every rank:
  loaded   after accelerate's prepare, each local shard equals its chunk of rank 0's initial tensor
  trained  N optimizer steps, finite losses, and every LoRA B shard (zeros at init) moved on every rank
Rank 0 writes its initial state dict to WORK/initial.pt for the others: use a small SHAPE (tiny, default;
llama-3.1-8b is 16 GB). --all-meta leaves the LoRA weights of the meta ranks on meta (no
onthefly.trainable_placeholders), to show what goes wrong without them. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402 - the code under check (it puts src/ on the path)
import onthefly  # noqa: E402
from llamaft.train.distributed import world  # noqa: E402

PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="tiny")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--work", default="/tmp/fsdp_onthefly_check")
    ap.add_argument("--gc", choices=["auto", "on", "off"], default="auto",
                    help="bench.py's --gc (on: FSDP's activation checkpointing)")
    ap.add_argument("--all-meta", action="store_true")
    opts = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world().local_rank)
    args = bench.parse_args([f"random:{opts.shape}", "lora", str(opts.seq), "2", "1", str(opts.steps),
                             os.path.join(opts.work, "unused.json"), "--strategy", "fsdp", "--variant", "plain",
                             "--gc", opts.gc])
    if opts.all_meta:
        onthefly.trainable_placeholders = lambda model: 0
    torch.manual_seed(0)
    model = bench.load_model(args)
    initial = os.path.join(opts.work, "initial.pt")
    if world().rank == 0:
        os.makedirs(opts.work, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, initial + ".tmp")
        os.replace(initial + ".tmp", initial)  # whole before any other rank can read it (after the broadcast)
    results = {}
    trainer = make_trainer(args, bench.run_config(args), model, opts, cuda, [Checks(initial, results)])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ok = results["loaded"] and results["trained"] and bool(losses) and all(map(_finite, losses))
    print(f"rank {world().rank}: losses {[round(x, 4) for x in losses]}; {'OK' if ok else 'FAILED'}", flush=True)
    sys.exit(0 if ok else 1)


def make_trainer(args, cfg, model, opts, cuda, callbacks):
    from transformers import TrainingArguments

    from llamaft.train.checkpoint import AtomicCheckpointTrainer  # bench.py's Trainer (CPU FSDP2 included)

    rows = bench.make_rows(2 * opts.steps * world().size, opts.seq)
    targs = TrainingArguments(
        output_dir=os.path.join(opts.work, "out"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1e-3, max_steps=opts.steps, logging_steps=1, save_strategy="no", report_to=[],
        remove_unused_columns=False, seed=0, bf16=True, use_cpu=not cuda, dataloader_drop_last=True,
        **bench.fsdp_arguments(args, cfg))
    return AtomicCheckpointTrainer(model=model, args=targs, train_dataset=rows, data_collator=bench.padded_collate,
                                   callbacks=callbacks)


def _finite(x) -> bool:
    return x == x and abs(x) != float("inf")


def _local(p):
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def _name(name: str) -> str:
    for prefix in PREFIXES:
        name = name.replace(prefix, "")
    return name


def shard_mismatches(model, initial: dict, rank: int, size: int) -> list[str]:
    """Names whose local shard differs from its dim-0 chunk of rank 0's initial tensor (FSDP2 shards dim 0
    with torch.chunk's sizes), in the shard's dtype (accelerate keeps trainable tensors in fp32)."""
    bad = []
    for name, p in model.named_parameters():
        local = _local(p.detach())
        chunks = torch.chunk(initial[_name(name)], size, dim=0)
        want = chunks[rank] if rank < len(chunks) else initial[_name(name)][:0]
        if local.shape != want.shape or not torch.equal(local.cpu(), want.to(local.dtype)):
            bad.append(name)
    return bad


class Checks:
    """on_train_begin: the shards hold rank 0's initial values; on_train_end: every LoRA B shard moved."""

    def __new__(cls, initial, results):
        from transformers import TrainerCallback

        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        from torch.distributed.fsdp import FSDPModule

        class _Checks(TrainerCallback):
            def on_train_begin(self, a, state, control, model=None, **k):
                ref = torch.load(initial, map_location="cpu", weights_only=True)
                bad = shard_mismatches(model, ref, world().rank, world().size)
                n = sum(1 for _ in model.parameters())
                wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
                units = sum(isinstance(m, FSDPModule) for m in model.modules())  # one a layer, not one for all
                results["loaded"] = not bad and n == len(ref)
                print(f"rank {world().rank}: loaded {n} tensors (rank 0 had {len(ref)}); local shards equal rank 0's "
                      f"initial values: {not bad} {bad[:3]}; {units} FSDP units; {wrapped} layers under activation "
                      "checkpointing", flush=True)

            def on_train_end(self, a, state, control, model=None, **k):
                b = [(n, _local(p.detach())) for n, p in model.named_parameters() if "lora_B" in n]
                still = [n for n, t in b if t.numel() and not bool(t.ne(0).any())]
                results["trained"] = bool(b) and not still
                print(f"rank {world().rank}: {len(b) - len(still)} of {len(b)} LoRA B shards moved off zero "
                      f"{still[:3]}", flush=True)

        return _Checks()


if __name__ == "__main__":
    main()
