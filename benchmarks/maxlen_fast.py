"""Longest single sequence that trains (forward + backward + optimizer step) for 8B QLoRA with
llamaft's fast path (varlen attention, fused loss, fused LoRA, gradient checkpointing), mirroring
../shared/bench/maxlen.py (same model, NF4 double quant, r=16 on 7 projections, PagedAdamW8bit).

    python benchmarks/maxlen_fast.py DIR L1,L2,... OUT.json   (ascending; stops at the first failure)
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench import load_model, versions  # noqa: E402

from llamaft.model.fast import FastPlan, apply_fast_path  # noqa: E402


def main():
    d, lens, out = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3]
    args = type("A", (), {"dir": d, "mode": "qlora"})()
    model = apply_fast_path(load_model(args), FastPlan(True, "varlen", True, True, False, [], fused_lora=True))
    model.train()
    import bitsandbytes as bnb

    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    res = {"tool": "llamaft-fast", "device": torch.cuda.get_device_name(0), "versions": versions(),
           "command": "python " + " ".join(sys.argv), "runs": []}
    for L in lens:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, 128000, (1, L), device="cuda")
        try:
            t = time.time()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            r = dict(L=L, ok=True, s_per_step=round(time.time() - t, 2),
                     peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=float(loss))
        except torch.cuda.OutOfMemoryError:
            r = dict(L=L, ok=False, oom=True)
        except Exception as e:  # noqa: BLE001 - record any failure and stop, like the reference script
            r = dict(L=L, ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
        print(json.dumps(r), flush=True)
        res["runs"].append(r)
        loss = None
        if not r["ok"]:
            break
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
