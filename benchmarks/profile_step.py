"""Where does a W512 LoRA micro-batch spend its time? fwd+bwd of packed 8-sequence micro-batches,
timed with CUDA events, for several variants of the fast path (one process, one model).

    python benchmarks/profile_step.py DIR OUT.json [variants...]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench import TARGETS, make_rows  # noqa: E402


def batches(bs, n=12):
    from llamaft.data.pack import flatten

    rows = make_rows(bs * n, 512)
    return [{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in flatten(rows[i:i + bs]).items()} for i in range(0, bs * n, bs)]


def time_variant(model, data, autocast: bool, warm=3):
    times, toks = [], 0
    for i, b in enumerate(data):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**b).loss
        loss.backward()
        e.record()
        torch.cuda.synchronize()
        if i >= warm:
            times.append(s.elapsed_time(e) / 1000)
            toks += b["input_ids"].numel()
    model.zero_grad(set_to_none=True)
    return dict(tok_per_s_fwd_bwd=round(toks / sum(times), 1), ms_per_microbatch=round(1000 * sum(times) / len(times), 1))


def profile(model, data, autocast, top=25):
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for b in data[:2]:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**b).loss
            loss.backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return p.key_averages().table(sort_by="self_cuda_time_total", row_limit=top)


def main():
    d, out = sys.argv[1], sys.argv[2]
    variants = sys.argv[3:] or ["A", "B", "C", "E", "D"]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llamaft.model.fast import FastPlan, apply_fast_path

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS))
    model = apply_fast_path(model, FastPlan(True, "varlen", True, False, False, []))
    model.train()
    d8, d16 = batches(8), batches(16, 8)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    # matmul ceiling at this micro-batch's shape (T=2600, 4096 -> 14336)
    a = torch.randn(2600, 4096, device="cuda", dtype=torch.bfloat16); w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(3): a @ w.t()
    torch.cuda.synchronize(); t = time.time()
    for _ in range(50): a @ w.t()
    torch.cuda.synchronize(); res["matmul_tflops_2600x4096x14336"] = round(50 * 2 * 2600 * 4096 * 14336 / (time.time() - t) / 1e12, 1)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for v in variants:
        t0 = time.time()
        if v == "A":  # as the benchmark ran: fp32 adapters under bf16 autocast
            res[v] = time_variant(model, d8, True)
            res[v + "_profile"] = profile(model, d8, True)
        elif v == "B":  # no fp32 input cast in PEFT (autocast still on)
            for m in lora_layers:
                m.cast_input_dtype_enabled = False
            res[v] = time_variant(model, d8, True)
        elif v == "C":  # bf16 adapters, no autocast at all
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
            res[v] = time_variant(model, d8, False)
            res[v + "_profile"] = profile(model, d8, False)
        elif v == "E":  # C with 16 sequences per micro-batch
            res[v] = time_variant(model, d16, False)
        elif v == "D":  # C + torch.compile of each decoder layer
            for layer in model.get_base_model().model.layers:
                layer.compile(dynamic=True)
            res[v] = time_variant(model, d8, False, warm=4)
        res[v + "_wall_s"] = round(time.time() - t0, 1)
        print(v, res[v], flush=True)
    print(res.get("A_profile", ""))
    print(res.get("C_profile", ""))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if "profile" not in k}))


if __name__ == "__main__":
    main()
