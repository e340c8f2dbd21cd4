"""Record one case of budget_curve.sh: merge what the driver measured into the tool's result JSON.

    python3 benchmarks/budget_record.py CASE.json --case TOOL:METHOD:BUDGET --rc N --wall S \\
        --command "..." --smi SAMPLES.txt --base-mib N --idle-mib N --log TOOL.log [--ballast-free-bytes N] \\
        [--gpu I --gpu-name NAME --gpu-total-mib N] [--reason TEXT]

The tool (bench.py, unsloth_bench.py, seed_baseline.py) wrote CASE.json if it finished; if it did not
(crash, out of memory, timeout, ballast never ready) this writes one with `status: failed`, a short
reason and the last lines of its log. Device peak = max nvidia-smi `memory.used` sampled during the
case minus the baseline (the ballast alone for a budget case, the idle card for `none`). Prints one
log line. Standard library only (runs beside the GPU jobs, no torch import).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.I)
EXC = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b:?.*")


def opt_float(s):
    """A number, or None for an empty string (the driver passes what nvidia-smi gave, maybe nothing)."""
    return float(s) if s.strip() else None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json")
    ap.add_argument("--case", required=True)
    ap.add_argument("--rc", type=int, required=True)
    ap.add_argument("--wall", type=float, required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--smi", help="nvidia-smi memory.used samples (MiB, one a line)")
    ap.add_argument("--base-mib", type=opt_float, help="used MiB before the tool started (ballast included)")
    ap.add_argument("--idle-mib", type=opt_float, help="used MiB before the case (no ballast)")
    ap.add_argument("--log", help="the tool's output")
    ap.add_argument("--ballast-free-bytes", type=opt_float, help="free bytes the ballast left (its READY file)")
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--gpu-name", default=None)
    ap.add_argument("--gpu-total-mib", type=opt_float, default=None)
    ap.add_argument("--reason", default="", help="failure found by the driver before the tool ran")
    ap.add_argument("--timeout", type=opt_float, default=None, help="the case's time limit (s)")
    return ap.parse_args(argv)


def parse_case(case):
    tool, method, budget = case.split(":")
    return tool, method, None if budget == "none" else float(budget)


def smi_max(path):
    """(max MiB, number of samples) from nvidia-smi's csv lines; lines that are not numbers are skipped."""
    vals = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    vals.append(float(line.strip()))
                except ValueError:
                    pass
    except OSError:
        pass
    return (max(vals) if vals else None), len(vals)


def log_lines(path, n=25):
    """Last n meaningful lines of a tool log (progress bars' carriage returns split, bars dropped)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read().replace("\r", "\n")
    except (OSError, TypeError):
        return []
    lines = [ln for ln in text.splitlines() if ln.strip() and not re.search(r"it/s\]|s/it\]", ln)]
    return lines[-n:]


def failure_reason(rc, lines, timeout):
    text = "\n".join(lines)
    if OOM.search(text):
        return "out of memory"
    if rc == 124 and timeout:
        return f"timeout after {timeout:g} s"
    if rc == 137:
        return "killed (SIGKILL: host out of memory, or still running 30 s after the timeout)"
    for ln in reversed(lines):
        if EXC.match(ln.strip()):
            return ln.strip()[:120]
    return f"exit {rc}" if rc else "no result JSON"


def load_tool_json(path):
    try:
        with open(path) as f:
            res = json.load(f)
        return res if isinstance(res, dict) else {}
    except (OSError, ValueError):
        return {}


def record(a):
    tool, method, budget = parse_case(a.case)
    res = load_tool_json(a.json) if not a.reason else {}
    ok = not a.reason and res.get("tokens_per_s") is not None
    lines = log_lines(a.log)
    peak_mib, n = smi_max(a.smi) if a.smi else (None, 0)
    base = a.base_mib if budget is not None else a.idle_mib
    smi_peak = round((peak_mib - base) / 1024, 2) if peak_mib is not None and base is not None else None
    if "command" in res:
        res["tool_command"] = res.pop("command")
    res.update(
        case=a.case, tool=tool, method=method, budget_gib=budget,
        status="ok" if ok else "failed", exit_code=a.rc, wall_s=round(a.wall, 1), command=a.command,
        smi_peak_gib=smi_peak, smi_max_mib=peak_mib, smi_baseline_mib=base, smi_idle_mib=a.idle_mib,
        smi_samples=n,
        fits=(smi_peak <= budget) if (ok and budget is not None and smi_peak is not None) else None,
        ballast_free_gib=round(a.ballast_free_bytes / 2**30, 2) if a.ballast_free_bytes else None,
        gpu_index=a.gpu, gpu_name=a.gpu_name,
        gpu_total_gib=round(a.gpu_total_mib / 1024, 1) if a.gpu_total_mib else None,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), finished_epoch=round(time.time(), 1))
    if not ok:
        res["reason"] = a.reason or failure_reason(a.rc, lines, a.timeout)
        res["log_tail"] = lines
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    return res


def log_line(res):
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    budget = "none" if res["budget_gib"] is None else f"{res['budget_gib']:g}"
    head = f"{res['case']:<20} {res['status']:<6}"
    if res["status"] != "ok":
        head += f" ({res['reason']})"
    fits = {True: "yes", False: "NO", None: "—"}[res["fits"]]
    return (f"{head}  {num(res.get('tokens_per_s'), ',.0f')} tok/s  torch {num(res.get('peak_mem_gib'), '.2f')} GiB"
            f"  device {num(res['smi_peak_gib'], '.2f')} GiB (budget {budget}, fits {fits})"
            f"  rc {res['exit_code']}  {res['wall_s']:.0f} s")


if __name__ == "__main__":
    print(log_line(record(parse_args())), flush=True)
