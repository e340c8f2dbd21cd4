"""Where does a W512 QLoRA micro-batch spend its time? fwd+bwd of packed micro-batches on the NF4
8B model, timed with CUDA events: no checkpointing, HF's checkpointing, ours (model/fast/recompute.py,
on the GPU and offloaded), 8 and 16 sequences; one torch.profiler table of ours; and the cost of one
bitsandbytes NF4 dequantisation vs one bf16 GEMM of the same weight.

    python benchmarks/profile_qlora.py DIR OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench import load_model  # noqa: E402
from profile_step import batches, time_variant  # noqa: E402


def profile_tables(model, data, top=22):
    from torch.profiler import ProfilerActivity, profile as prof

    torch.cuda.synchronize()
    t = time.time()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for b in data[:2]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**b).loss
            loss.backward()
        torch.cuda.synchronize()
    wall = time.time() - t
    model.zero_grad(set_to_none=True)
    ka = p.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ka) / 1e6
    return dict(wall_s_2_microbatches=round(wall, 3), gpu_busy_s=round(cuda_total, 3),
                by_cuda=ka.table(sort_by="self_cuda_time_total", row_limit=top),
                by_cpu=ka.table(sort_by="self_cpu_time_total", row_limit=15))


def dequant_cost():
    import bitsandbytes.functional as F

    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    x = torch.randn(2600, 4096, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn in (("dequant_nf4_us", lambda: F.dequantize_4bit(q, state)), ("gemm_2600_us", lambda: x @ w.t())):
        for _ in range(5):
            fn()
        torch.cuda.synchronize(); t = time.time()
        for _ in range(100):
            fn()
        torch.cuda.synchronize(); out[name] = round((time.time() - t) * 1e4, 1)
    return out


def main():
    d, out = sys.argv[1], sys.argv[2]
    from llamaft.model.fast import FastPlan, apply_fast_path, decoder_layers
    from llamaft.model.fast.recompute import install

    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dequant": dequant_cost()}
    print(res, flush=True)
    model = load_model(type("A", (), {"dir": d, "mode": "qlora"})())
    model = apply_fast_path(model, FastPlan(True, "varlen", True, False, False, [], fused_lora=True, loss_chunk_rows=256))
    model.train()
    d8, d16 = batches(8), batches(16, 8)
    torch.cuda.reset_peak_memory_stats()
    res["no_ckpt_8"] = time_variant(model, d8, True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    res["hf_ckpt_8"] = time_variant(model, d8, True)
    model.gradient_checkpointing_disable()
    layers = decoder_layers(model)
    originals = [layer.forward for layer in layers]
    install(layers, offload=False)
    res["own_ckpt_8"] = time_variant(model, d8, True)
    res["own_ckpt_8_profile"] = profile_tables(model, d8)
    for layer, f in zip(layers, originals):
        layer.forward = f
    install(layers, offload=True)
    res["offload_ckpt_8"] = time_variant(model, d8, True)
    res["offload_ckpt_16"] = time_variant(model, d16, True)
    for k, v in res.items():
        if "profile" not in k:
            print(k, v, flush=True)
    p = res["own_ckpt_8_profile"]
    print("wall", p["wall_s_2_microbatches"], "gpu busy", p["gpu_busy_s"])
    print(p["by_cuda"]); print(p["by_cpu"])
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
