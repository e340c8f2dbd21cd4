"""Several processes (DDP; gloo on CPU): the batch shared out, rank 0 reading and writing alone, the
launcher's exit codes, and 2-process runs of a tiny random Llama against a 1-process run.

The multi-process tests start real processes (`llamaft train --nproc 2`, and torchrun itself, so
nothing depends on llamaft having started the launcher); each is bounded by a timeout, after which
every process of the run is killed. Skip them with `-m "not multiprocess"`.
"""

import signal
from types import SimpleNamespace

import pytest
import yaml

from llamaft.cli import main
from llamaft.config import config_from_dict
from llamaft.errors import ConfigError, LlamaftError
from llamaft.train import distributed, launch
from llamaft.train.callbacks import read_metrics
from distributed_helpers import _adapter, _llamaft, _losses, _processes_naming, _project, _torchrun
from train_helpers import cli_project, strict_json


def _cfg(**train):
    return config_from_dict({"model": {"name": "m"}, "data": {"train": ["t.jsonl"]},
                             "train": {"micro_batch_size": 4, **train}})


# ---------------------------------------------------------------------------------------------
# The batch: the configured one is global


def test_each_process_runs_its_share_of_the_accumulation():
    cfg = _cfg(gradient_accumulation=8)
    assert distributed.per_process(cfg, 1) is cfg
    mine = distributed.per_process(cfg, 4)
    assert (mine.train.micro_batch_size, mine.train.gradient_accumulation) == (4, 2)
    assert cfg.train.gradient_accumulation == 8  # the user's config (config.yaml) is left as it was


def test_an_accumulation_that_does_not_divide_is_one_line_with_the_fix():
    with pytest.raises(ConfigError) as err:
        distributed.check(_cfg(gradient_accumulation=3), 2)
    assert str(err.value) == (
        "train.gradient_accumulation=3 does not divide among 2 processes: the configured batch "
        "(train.micro_batch_size x train.gradient_accumulation = 12 sequences per optimizer step) is global and "
        "each process runs gradient_accumulation / 2 micro-batches; set train.gradient_accumulation=4 "
        "(a multiple of 2) or use a process count that divides 3")


def test_an_accelerate_config_for_fsdp_needs_the_fsdp_strategy(monkeypatch):
    """The strategy is the config's: accelerate launch with an FSDP config runs FSDP only when the config says so."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"launcher asks for FSDP \(ACCELERATE_USE_FSDP=true\); llamaft runs "
                                          r"distributed.strategy=auto .*: set distributed.strategy=fsdp"):
        distributed.check(_cfg(gradient_accumulation=2), 2)
    fsdp = _cfg(gradient_accumulation=2)
    fsdp.distributed.strategy = "fsdp"
    distributed.check(fsdp, 2)


def test_distributed_strategy_is_validated():
    assert _cfg().distributed.strategy == "auto"
    fsdp = config_from_dict({"model": {"name": "m"}, "data": {"train": ["t.jsonl"]},
                             "distributed": {"strategy": "fsdp", "fsdp": {"sharding": "hybrid", "cpu_offload": True}}})
    assert (fsdp.distributed.fsdp.sharding, fsdp.distributed.fsdp.cpu_offload) == ("hybrid", True)
    assert fsdp.distributed.fsdp.activation_checkpointing is False
    for bad, key in (({"strategy": "zero3"}, "distributed.strategy"), ({"fsdp": {"sharding": "half"}}, "distributed.fsdp.sharding"),
                     ({"fsdp": {"offload": True}}, "distributed.fsdp")):
        with pytest.raises(ConfigError, match=key):
            config_from_dict({"model": {"name": "m"}, "data": {"train": ["t.jsonl"]}, "distributed": bad})


def test_the_summary_states_the_global_batch():
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=2, fsdp="")
    assert distributed.batch_summary(args) == {
        "micro_batch_size": 4, "gradient_accumulation": 2, "processes": 2, "global_batch": 16, "strategy": "ddp"}
    sharded = SimpleNamespace(**{**vars(args), "fsdp": True})  # what ran, whatever the config's `auto` chose
    assert distributed.batch_summary(sharded)["strategy"] == "fsdp"
    one = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=1)
    assert distributed.batch_summary(one) == {
        "micro_batch_size": 4, "gradient_accumulation": 2, "processes": 1, "global_batch": 8}


def test_one_process_shares_nothing():
    """No launcher: on_main / from_main / barrier are plain calls (no process group is made)."""
    assert distributed.world() == distributed.World(0, 0, 1)
    assert distributed.on_main(lambda: 7, "x") == 7
    assert distributed.from_main("v") == "v"
    distributed.barrier()
    with pytest.raises(LlamaftError, match="bad"):
        distributed.on_main(lambda: (_ for _ in ()).throw(LlamaftError("bad")), "x")


# ---------------------------------------------------------------------------------------------
# The launcher


def test_process_count(monkeypatch):
    for name in launch.PROCESS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    assert launch.processes(None) == 1  # CPU: one process unless asked
    assert launch.processes(3) == 3  # CPU: gloo, any count
    monkeypatch.setattr(launch, "visible_gpus", lambda: 4)
    assert launch.processes(None) == 4  # every visible GPU
    with pytest.raises(LlamaftError, match=r"--nproc 8, but 4 GPU\(s\) are visible"):
        launch.processes(8)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: it started the processes
    assert launch.processes(None) == 1 and launch.processes(2) == 1
    with pytest.raises(LlamaftError, match=r"--nproc 4, but a launcher already started 2 processes"):
        launch.processes(4)


def _failure(exitcode, timestamp, pid=100):
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, pid=pid)


def test_the_exit_code_is_the_first_failure(capsys):
    err = SimpleNamespace(failures={1: _failure(2, 10), 0: _failure(-15, 11)})
    assert launch._exit_code(err) == 2
    assert capsys.readouterr().err == ""  # the failed process printed its own line
    # Within one second (the launcher's resolution) the cause over what follows from it: an error of ours
    # over a lost peer (1) or the launcher's SIGTERM; a kill from outside over everything.
    assert launch._exit_code(SimpleNamespace(failures={0: _failure(1, 10), 1: _failure(3, 10)})) == 3
    assert launch._exit_code(SimpleNamespace(failures={0: _failure(143, 10), 1: _failure(1, 10)})) == 1
    assert launch._exit_code(SimpleNamespace(failures={0: _failure(2, 10), 1: _failure(2, 10)})) == 2
    killed = SimpleNamespace(failures={0: _failure(1, 10), 1: _failure(-signal.SIGKILL, 10, pid=42)})
    assert launch._exit_code(killed) == 137
    assert capsys.readouterr().err.splitlines() == [
        "llamaft train: error: process 1 (pid 42) was killed by SIGKILL; the others were stopped. "
        "Continue from the last complete checkpoint with train.resume=true"]


def test_a_batch_that_does_not_divide_is_refused_before_any_process_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "launch", lambda *a: pytest.fail("no process may start"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "m"}, "data": {"train": ["t.jsonl"]},
                                   "train": {"gradient_accumulation": 3}}))
    assert main(["train", str(cfg), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("llamaft train: error: train.gradient_accumulation=3 does not divide")


# ---------------------------------------------------------------------------------------------
# Two processes against one (tiny random Llama, gloo)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same project in two processes: started by torchrun itself, rank 1 killed with SIGKILL in the
    middle of step 4 (after checkpoint-3), then resumed with `llamaft train --nproc 2`."""
    root = tmp_path_factory.mktemp("two")
    cfg = _project(root)
    killed = _torchrun("--kill", "train:4@1", "train", str(cfg), marker=str(cfg))
    after_kill = {"returncode": killed.returncode, "stderr": killed.stderr, "survivors": _processes_naming(str(cfg)),
                  "checkpoints": sorted(p.name for p in (root / "run" / "checkpoints").iterdir()),
                  "complete": sorted(p.name for p in (root / "run" / "checkpoints").glob("checkpoint-*")
                                     if (p / "trainer_state.json").is_file()),
                  "files": {p.name for p in (root / "run" / "checkpoints" / "checkpoint-3").glob("*")},
                  "summary": strict_json((root / "run" / "summary.json").read_text())
                  if (root / "run" / "summary.json").is_file() else None}
    resumed = _llamaft("train", str(cfg), "--nproc", "2", "train.resume=true", marker=str(cfg))
    return SimpleNamespace(run=root / "run", after_kill=after_kill, resumed=resumed)


@pytest.mark.multiprocess
def test_kill_9_of_one_rank_ends_every_rank_and_keeps_complete_checkpoints(two_processes):
    kill = two_processes.after_kill
    assert kill["returncode"] != 0, kill["stderr"][-3000:]
    assert kill["survivors"] == []  # the launcher ended rank 0 too
    assert kill["complete"] == ["checkpoint-2", "checkpoint-3"], kill  # save_total_limit 2; nothing of step 4
    assert set(kill["checkpoints"]) <= {"checkpoint-2", "checkpoint-3", ".staging"}  # staging: removed on resume
    # each rank's RNG state beside rank 0's weights, optimizer and state
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= kill["files"]


@pytest.mark.multiprocess
def test_two_processes_train_what_one_process_trains(one_process, two_processes):
    """Same sequences per optimizer step, same loss per step (1e-5, fp32), same evaluation, same adapter,
    after a SIGKILL and a resume too; one summary.json stating the global batch; rank 0's lines only."""
    resumed = two_processes.resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = two_processes.run
    one, two = _losses(one_process, "train/loss"), _losses(run, "train/loss")
    assert sorted(two) == list(range(1, 7))  # each step once: steps 1-3 before the kill, 4-6 resumed
    for step in range(1, 7):
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    one_eval, two_eval = _losses(one_process, "eval/val/loss"), _losses(run, "eval/val/loss")
    assert sorted(two_eval) == [3, 6] and all(abs(one_eval[s] - two_eval[s]) < 1e-5 for s in (3, 6))
    rows = [(r["step"], k) for r in read_metrics(run / "metrics.jsonl") for k in r if k.startswith(("eval/", "train/loss"))]
    assert len(rows) == len(set(rows))  # no row written twice (one writer)
    assert _losses(run, "eval/val/exact_match").keys() == {3, 6}  # generation metrics: rank 0, once per evaluation

    import torch

    a, b = _adapter(one_process), _adapter(run)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)

    summary = strict_json((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["batch"] == {"micro_batch_size": 4, "gradient_accumulation": 1, "processes": 2, "global_batch": 8,
                                "strategy": "ddp"}
    assert strict_json((one_process / "summary.json").read_text())["batch"]["global_batch"] == 8
    out = resumed.stdout.splitlines()
    assert sum(line.startswith("lora: ") for line in out) == 1 and sum(line.startswith("run directory") for line in out) == 1
    assert "ddp: 2 processes x 4 sequences per micro-batch x 1 accumulation = 8 sequences per optimizer step" in resumed.stdout


@pytest.mark.multiprocess
def test_a_data_error_stops_every_rank_with_one_line(tmp_path):
    cfg = cli_project(tmp_path)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[2] = '{"question": "a b", "answer": '  # broken JSON on line 3
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    proc = _llamaft("train", str(cfg), "--nproc", "2", marker=str(cfg))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"llamaft train: error: {tmp_path / 'train.jsonl'}:line 3"), proc.stderr
    assert _processes_naming(str(cfg)) == []
    assert not (tmp_path / "run").exists()  # rank 0 found it before creating anything


def test_a_checkpoint_of_two_processes_resumes_in_one(one_process, two_processes, tmp_path):
    """DDP checkpoints hold the whole adapter, the optimizer and the schedule: checkpoint-5 of the 2-process
    run, resumed by one process, trains step 6 as the 1-process run did (same global batch, same data order)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_processes.run, run)  # config.yaml names its data from RUN/data (portable)
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    assert main(["train", str(run / "config.yaml"), "train.resume=true", f"train.output_dir={run}"]) == 0
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # 1-5 kept from the 2-process run, 6 trained by one process
    assert abs(_losses(run, "train/loss")[6] - _losses(one_process, "train/loss")[6]) < 1e-5
    assert strict_json((run / "summary.json").read_text())["batch"]["processes"] == 1
