"""Longest single sequence that trains (forward + backward + optimizer step) for 8B QLoRA with
llamaft's fast path, mirroring ../shared/bench/maxlen.py (same model, NF4 double quant, r=16 on 7
projections, PagedAdamW8bit): fused LoRA, fused loss, layer checkpointing with the layer inputs
offloaded to pinned CPU memory, MLP tiled in 16k-token chunks, input embeddings in CPU memory; a
single-example row runs causal SDPA (cuDNN). No torch.compile (each new length would recompile).

    python benchmarks/maxlen_fast.py DIR L1,L2,... OUT.json [ATTN[,ATTN...]] [--no-offload] [--repeat N] [--deferred]
        (lengths ascending; per attention kernel, stops at the first failure). ATTN: varlen = torch's
        varlen_attn (FA2, the default), sdpa = HF's SDPA path (causal, one sequence), cudnn = the
        same forced onto cuDNN attention. --repeat N: N steps per length; s_per_step is the first (as
        ../shared/bench/maxlen.py times it), s_per_step_all lists every step (later ones: steady state).
        --deferred: the MLP deferred to the backward in 16k-token chunks (recompute.defer_mlp, what the
        plan now chooses for qlora) instead of the 16k tiles, which recompute each tile's MLP forward once more.
"""

import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench import load_model, versions  # noqa: E402

from llamaft.model.fast import FastPlan, apply_fast_path  # noqa: E402
from llamaft.model.fast.attention import install_attention  # noqa: E402


def main():
    d, lens, out = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3]
    attns = (sys.argv[4] if len(sys.argv) > 4 and not sys.argv[4].startswith("--") else "varlen").split(",")
    offload = "--no-offload" not in sys.argv
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 1
    from llamaft.model.fast import configure_allocator

    configure_allocator()  # as llamaft.train does before the model loads (expandable segments)
    args = type("A", (), {"dir": d, "mode": "qlora"})()
    deferred = "--deferred" in sys.argv
    plan = FastPlan(True, "varlen", True, True, False, [], fused_lora=True,
                    own_checkpointing=True, offload_checkpoints=offload, tile_mlp_rows=0 if deferred else 16384,
                    mlp_chunk_rows=16384 if deferred else 0, loss_chunk_rows=1024,
                    cpu_embeddings=True, cpu_lm_head=True, nf4_kernel=True)  # as choose_plan does for qlora
    model = apply_fast_path(load_model(args), plan)
    model.train()
    import bitsandbytes as bnb

    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    res = {"tool": "llamaft-fast", "offload_checkpoints": offload, "deferred_mlp": deferred, "device": torch.cuda.get_device_name(0),
           "versions": versions(), "command": "python " + " ".join(sys.argv), "runs": []}
    for attn in attns:
        install_attention(model, "sdpa" if attn == "cudnn" else attn)
        for r in run_lengths(model, opt, lens, attn, repeat):
            res["runs"].append(dict(attention=attn, **r))
            with open(out, "w") as f:  # after every length: a later crash keeps what was measured
                json.dump(res, f, indent=1)


def run_lengths(model, opt, lens, attn, repeat=1):
    if attn == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])  # noqa: E731
    else:
        backend = contextlib.nullcontext
    for L in lens:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, 128000, (1, L), device="cuda")
        try:
            times = []
            for _ in range(repeat):
                t = time.time()
                with backend(), torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                with backend():
                    loss.backward()
                opt.step(); opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(round(time.time() - t, 2))
            r = dict(L=L, ok=True, s_per_step=times[0], s_per_step_all=times,
                     peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=float(loss))
        except torch.cuda.OutOfMemoryError:
            r = dict(L=L, ok=False, oom=True)
        except Exception as e:  # noqa: BLE001 - record any failure and stop, like the reference script
            r = dict(L=L, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        print(attn, json.dumps(r), flush=True)
        yield r
        loss = None
        if not r["ok"]:
            break


if __name__ == "__main__":
    main()
