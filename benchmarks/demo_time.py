"""How long `llamaft demo` takes a newcomer: a fresh model cache (so the one-time preparation counts),
the installed `llamaft` command, wall time from start to exit, and the seconds of each stage.

    python benchmarks/demo_time.py --out benchmarks/results/demo_time.json

Writes the machine (CPU count, load average before and after: a shared machine is slower than an idle
one), versions, the exact command, wall seconds, the stage seconds from RUN/summary.json `demo`, and
the before/after exact match. src/llamaft/demo.py's STAGE_SECONDS (the ETA's reference) come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/demo_time.json")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the model cache (measures a second demo)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llamaft-demo-time-"))
    env = dict(os.environ)
    if not a.keep_cache:
        env["LLAMAFT_CACHE"] = str(work / "cache")  # a newcomer's first run prepares the model
    command = [shutil.which("llamaft") or "llamaft", "demo", "--out", str(work / "runs" / "demo")]
    load_before = os.getloadavg()
    t0 = time.monotonic()
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((work / "runs" / "demo" / "summary.json").read_text())
    result = {
        "command": " ".join(["llamaft", "demo"]) + ("" if a.keep_cache else "  (fresh LLAMAFT_CACHE)"),
        "wall_s": round(wall, 1),
        "stages_s": summary["demo"]["stages_s"],
        "exact_match": {phase: {s: m["exact_match"] for s, m in summary[key].items()}
                        for phase, key in (("base", "before"), ("tuned", "after"))},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "last_lines": proc.stdout.strip().splitlines()[-12:],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("wall_s", "stages_s", "exact_match")}, indent=2))


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("llamaft", "torch", "transformers", "peft", "accelerate")}


if __name__ == "__main__":
    main()
