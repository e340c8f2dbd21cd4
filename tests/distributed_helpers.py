"""Runs of several processes for the tests (tests/train/test_distributed.py, test_fsdp.py): a tiny project
whose 2-process run trains exactly what one process trains, the launchers bounded by a timeout (every
process of a run that hangs is killed), and what the tests read back from a run directory."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llamaft.train.callbacks import read_metrics
from train_helpers import cli_project

TIMEOUT = 150  # seconds for one multi-process run (about 30 on 2 shared cores: 2 processes importing torch + HF)


def _project(root: Path) -> Path:
    """cli_project (24 q/a rows, 6 steps of 8 sequences, a checkpoint every step) with an 8-row validation set,
    generation metrics on it at steps 3 and 6, and no dropout (each process would draw its own masks).

    The validation set is one micro-batch per process, and every answer has as many tokens: HF's evaluation
    loss is the mean of its batches' means in one process, but weighs each process's batch by its label
    tokens among all processes' (it gathers num_items_in_batch); equal counts make the two the same number."""
    path = cli_project(root, eval_every=3)
    cfg = yaml.safe_load(path.read_text())
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()][:8]
    (root / "val.jsonl").write_text("".join(json.dumps({"question": r["question"] + " ?", "answer": "yes"}) + "\n"
                                            for r in rows))
    cfg["lora"]["dropout"] = 0.0
    cfg["data"]["validation"] = {"val": str(root / "val.jsonl")}
    cfg["eval"] = {"generation": {"val": {"metrics": ["exact_match"], "max_samples": 4, "max_new_tokens": 3}}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _processes_naming(marker: str) -> list[int]:
    """pids of live processes whose command line names `marker` (the run's config path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(proc.name))
    return found


def _bounded(cmd: list[str], marker: str) -> subprocess.CompletedProcess:
    """Run cmd; past TIMEOUT every process of the run is killed (the launcher starts its workers in sessions
    of their own, so killing the launcher alone would leave them) and the test fails."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        for pid in _processes_naming(marker):
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{cmd[3:6]} still running after {TIMEOUT} s (hang); stderr: {(err.stderr or b'')[-2000:]!r}")


def _llamaft(*args: str, marker: str) -> subprocess.CompletedProcess:
    return _bounded([sys.executable, "-m", "llamaft", *args], marker)


def _torchrun(*args: str, marker: str) -> subprocess.CompletedProcess:
    child = Path(__file__).resolve().with_name("train_child.py")
    return _bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                     str(child), *args], marker)


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _losses(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


