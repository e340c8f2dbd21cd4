"""SIGTERM (a scheduler's preemption, `kill`, `docker stop`) stops a command like Ctrl-C: exit 143,
one line, a training run's summary says "interrupted" and its checkpoints stay complete."""

import json
import os
import signal
import subprocess
import sys
import time

from llamaft import cli
from train_helpers import cli_project


def test_sigterm_is_an_interrupt_with_exit_143_and_the_old_handler_comes_back(monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)

    def command(_args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "_cmd_merge", command)
    assert cli.main(["merge", "runs/x", "--out", "y"]) == 143
    assert capsys.readouterr().err == "terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_training_keeps_complete_checkpoints_and_an_honest_summary(tmp_path):
    cfg = cli_project(tmp_path, max_steps=400, save_total_limit=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "llamaft", "train", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == "terminated (SIGTERM)", err
    assert "continue with: llamaft train" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 2 <= summary["steps"] < 400
    names = sorted(p.name for p in ckpts.iterdir())
    assert names and all(n.startswith("checkpoint-") for n in names), names  # no staging left behind
    assert all((ckpts / n / "trainer_state.json").is_file() for n in names)
