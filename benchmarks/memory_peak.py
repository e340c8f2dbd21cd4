"""What is alive at the peak of a W512 QLoRA micro-batch? Runs the default QLoRA plan (micro-batch
given) for a few fwd+bwd passes with torch's allocator history on, replays the trace to the moment of
peak allocation, and groups the live blocks by the innermost llamaft / transformers / peft / bnb
source line that allocated them.

    python benchmarks/memory_peak.py DIR MICRO_BATCH OUT.json [bench.py-style fast.* overrides k=v ...]
"""

from __future__ import annotations

import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench import load_model, make_rows  # noqa: E402


def where(frames):
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in ("llamaft", "transformers", "peft", "bitsandbytes", "torch/_inductor", "torchinductor", "benchmarks")):
            return f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
    return "other"


def live_at_peak(snapshot):
    live, total, best, best_live = {}, 0, 0, {}
    for ev in snapshot["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], where(ev.get("frames", [])))
            total += ev["size"]
            if total > best:
                best, best_live = total, dict(live)
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    return best, best_live


def main():
    d, mbs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    over = dict(a.split("=", 1) for a in sys.argv[4:])
    from llamaft.data.pack import flatten
    from llamaft.model.fast import apply_fast_path, choose_plan

    sys.argv = sys.argv[:1]
    from bench import run_config

    args = type("A", (), dict(dir=d, mode="qlora", seq=512, bs=mbs, ga=32 // mbs, variant="fast", gc="auto",
                              compile=over.get("compile", "auto"), regroup="off", offload="auto", partial="auto",
                              memory_gib=None, nf4=over.get("nf4", "auto"), cpu_emb="auto", optim="paged_adamw_8bit"))()
    cfg = run_config(args)
    model = load_model(args)
    rows = make_rows(mbs * 4, 512)
    plan = choose_plan(cfg, model, [len(r["input_ids"]) for r in rows])
    model = apply_fast_path(model, plan)
    model.train()
    data = [{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in flatten(rows[i:i + mbs]).items()} for i in range(0, len(rows), mbs)]
    static = torch.cuda.memory_allocated()

    def step(b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()

    step(data[0]); step(data[1])  # compile + gradients allocated
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step(data[2])
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, live = live_at_peak(snap)
    groups = collections.Counter()
    for size, w in live.values():
        groups[w] += size
    gib = 2**30
    res = dict(micro_batch=mbs, tokens=int(data[2]["input_ids"].numel()), static_gib=round(static / gib, 3),
               before_step_gib=round(base / gib, 3), peak_gib=round(torch.cuda.max_memory_allocated() / gib, 3),
               traced_peak_extra_gib=round(peak / gib, 3),
               live_at_peak=[(w, round(s / gib, 3)) for w, s in groups.most_common(30)],
               plan=plan.reasons)
    print(json.dumps(res, indent=1))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
