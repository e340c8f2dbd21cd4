"""torch.compile of decoder blocks (fast.compile; where `auto` turns it on, and the measurements
behind that, is plan.compile_blocks / plan.COMPILE_MEASURED_FOR).

W512 LoRA: +3% fwd+bwd alone (profile_w512_lora.json, variant D), +8% in the Trainer
(run7_w512_lora_fast_compile.json vs run6_w512_lora_fast.json) for ~90 s of compilation.
dynamic=True because packed rows change length every batch (static shapes would recompile until
the cache limit).
"""

from __future__ import annotations

import torch


def compile_fn(fn):
    """One decoder layer's forward, compiled (used inside model/fast/recompute.py's checkpoint)."""
    return torch.compile(fn, dynamic=True)


def compile_blocks(layers) -> int:
    """Compile each decoder layer in place (`layers`: model.fast.decoder_layers(model), or None)."""
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
