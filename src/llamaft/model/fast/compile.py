"""torch.compile of decoder blocks (opt-in: fast.compile=on).

Measured on W512 LoRA (benchmarks/results/profile_w512_lora.json, variant D): +3% fwd+bwd throughput
for ~80 s of compilation, so `auto` leaves it off; long runs can turn it on. dynamic=True because
packed rows change length every batch (static shapes would recompile until the cache limit).
"""

from __future__ import annotations


def compile_blocks(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
