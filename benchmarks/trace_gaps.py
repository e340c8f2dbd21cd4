"""Where a profiled step's GPU waited, from its chrome trace (torch.profiler's export_chrome_trace).

    python benchmarks/trace_gaps.py TRACE.json[.gz]      # prints the summary as JSON

Kernel time by kind (bench.py summarize_profile) cannot say whether the host copies of offloaded
checkpoints and the parked lm_head overlap the compute, nor what the GPU waited for when nothing
ran. This reads the timeline instead:
  * compute_busy_ms: the union of every GPU event but host<->device copies (kernels, memsets and
    device-to-device copies, which run on the compute stream); compute_idle_ms = span - busy;
  * host_copy_ms and host_copy_hidden_ms: the union of HtoD / DtoH copies, and the part of it that
    ran while compute was busy (hidden); host_copy_exposed_ms: the rest;
  * gaps: each stretch of compute idleness >= MIN_GAP_US, blamed on the CUDA runtime call the host was
    blocked in (a synchronize, a cudaMalloc / cudaFree, a blocking copy) when one covers most of the
    gap; else, when the kernel ending the gap was queued before the gap began, on a wait for another
    stream (an event: e.g. a copy the kernel needs); else on the CPU op that launched that kernel
    late (the host was behind: launch bound). Summed by culprit.
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys

MIN_GAP_US = 20.0
# CUDA runtime / driver calls that block the host (or the device) until earlier work is done
BLOCKING = ("Synchronize", "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaFreeHost", "cudaMemcpy ", "cuMemUnmap",
            "cuMemMap", "cuMemCreate", "cuMemRelease", "cuMemSetAccess", "cudaMemcpy")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def _intersection(a, b) -> float:
    """Total overlap of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            total += e - s
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _is_host_copy(ev: dict) -> bool:
    name = ev.get("name", "")
    return ev.get("cat") == "gpu_memcpy" and ("HtoD" in name or "DtoH" in name)


def _ops_by_thread(cpu_ops: list[dict]) -> dict:
    by: dict = {}
    for op in sorted(cpu_ops, key=lambda e: e["ts"]):
        by.setdefault(op.get("tid"), []).append(op)
    return {tid: (ops, [o["ts"] for o in ops]) for tid, ops in by.items()}


def _launcher(rt: dict | None, ops_by_thread: dict) -> str:
    """The innermost CPU op (same thread) around runtime call `rt` (a kernel's launch): nested ops
    start later, so the latest-starting op that still covers the call."""
    if rt is None:
        return "?"
    ops, starts = ops_by_thread.get(rt.get("tid"), ([], []))
    for i in range(bisect.bisect_right(starts, rt["ts"]) - 1, -1, -1):
        if ops[i]["ts"] + ops[i].get("dur", 0) >= rt["ts"]:
            return ops[i]["name"]
    return rt.get("name", "?")


def summarize(events: list[dict], top: int = 15) -> dict:
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    compute = [e for e in gpu if not _is_host_copy(e)]
    copies = [e for e in gpu if _is_host_copy(e)]
    busy = _union([(e["ts"], e["ts"] + e.get("dur", 0)) for e in compute])
    copy_iv = _union([(e["ts"], e["ts"] + e.get("dur", 0)) for e in copies])
    start = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e.get("dur", 0) for e in gpu)
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")]
    runtime_by_corr = {e.get("args", {}).get("correlation"): e for e in runtime}
    blocking = [e for e in runtime if any(k in e.get("name", "") for k in BLOCKING)]
    ops_by_thread = _ops_by_thread([e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"])
    compute_sorted = sorted(compute, key=lambda e: e["ts"])
    starts = [e["ts"] for e in compute_sorted]
    blame: dict[str, list[float]] = {}
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        gap = gap_end - gap_start
        if gap < MIN_GAP_US:
            continue
        culprit = None
        for rt in blocking:
            s, e = rt["ts"], rt["ts"] + rt.get("dur", 0)
            if min(e, gap_end) - max(s, gap_start) >= gap / 2:
                culprit = "blocked: " + rt["name"]
                break
        if culprit is None:
            i = bisect.bisect_left(starts, gap_end)
            corr = compute_sorted[i].get("args", {}).get("correlation") if i < len(starts) else None
            rt = runtime_by_corr.get(corr)
            # queued before the gap began: the GPU waited on another stream (an event), not on the host
            how = "waited on a stream: " if rt is not None and rt["ts"] + rt.get("dur", 0) < gap_start else "launch: "
            culprit = how + _launcher(rt, ops_by_thread)
        entry = blame.setdefault(culprit, [0.0, 0])
        entry[0] += gap
        entry[1] += 1
    copy_by_kind: dict[str, float] = {}
    for e in copies:
        kind = "HtoD" if "HtoD" in e["name"] else "DtoH"
        copy_by_kind[kind] = copy_by_kind.get(kind, 0.0) + e.get("dur", 0)
    hidden = _intersection(copy_iv, busy)
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    gaps = sorted(blame.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(
        span_ms=ms(end - start), compute_busy_ms=ms(_length(busy)), compute_idle_ms=ms(end - start - _length(busy)),
        host_copy_ms=ms(_length(copy_iv)), host_copy_hidden_ms=ms(hidden),
        host_copy_exposed_ms=ms(_length(copy_iv) - hidden),
        host_copy_by_kind_ms={k: ms(v) for k, v in copy_by_kind.items()},
        gaps_min_us=MIN_GAP_US, gaps=[dict(culprit=c[:140], ms=ms(v[0]), count=v[1]) for c, v in gaps])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(summarize(load(argv[0])), indent=1))


if __name__ == "__main__":
    main()
