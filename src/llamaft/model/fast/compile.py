"""torch.compile of decoder blocks (fast.compile; where `auto` turns it on, and the measurements
behind that, is plan.compile_blocks / plan.COMPILE_MEASURED_FOR).

W512 LoRA: +3% fwd+bwd alone (profile_w512_lora.json, variant D), +8% in the Trainer
(run7_w512_lora_fast_compile.json vs run6_w512_lora_fast.json) for ~90 s of compilation.
dynamic=True because packed rows change length every batch (static shapes would recompile until
the cache limit).
"""

from __future__ import annotations

import os

import torch


def _for_ddp() -> None:
    """Several processes: no DDPOptimizer. Under DDP dynamo splits each compiled graph at gradient
    bucket boundaries, and on a compiled decoder layer that split failed on the GPU ("'float' object
    has no attribute 'meta'", torch 2.11, 2 x H200, benchmarks/results/scale_h200). Our compiled unit
    is one layer: its gradients are ready when its backward ends, so DDP's hooks still overlap the
    all-reduce with the layers below."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch._dynamo.config.optimize_ddp = False


def compile_fn(fn):
    """One decoder layer's forward, compiled (used inside model/fast/recompute.py's checkpoint)."""
    _for_ddp()
    return torch.compile(fn, dynamic=True)


def compile_blocks(layers) -> int:
    """Compile each decoder layer in place (`layers`: model.fast.decoder_layers(model), or None)."""
    if layers is None:
        return 0
    _for_ddp()
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
