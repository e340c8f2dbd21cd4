"""A checkpoint the machine cannot write (full disk, read-only) stops training with one line, exit 2,
nothing half-written, the last good checkpoint intact and resumable, and an honest summary."""

import json

import pytest
import torch

from llamaft.cli import main
from llamaft.train.checkpoint import latest_complete, write_failure
from path_helpers import one_error_line
from train_helpers import cli_project


def test_write_failure_recognises_machine_errors_only():
    import errno

    assert write_failure(OSError(errno.ENOSPC, "x")) == "No space left on device"
    torch_msg = "[enforce fail at inline_container.cc:664] . unexpected pos 14336 vs 14228"
    assert "full disk" in write_failure(RuntimeError(torch_msg))
    assert "full disk" in write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert write_failure(RuntimeError("CUDA error: device-side assert triggered")) is None
    assert write_failure(ValueError("unexpected pos 1 vs 2")) is None


def test_a_full_disk_during_a_checkpoint_stops_with_one_line(tmp_path, monkeypatch, capsys):
    """The third checkpoint's optimizer state fails the way torch reports a full disk."""
    import transformers.trainer as hf_trainer

    cfg = cli_project(tmp_path)
    real_save, calls = hf_trainer.torch.save, []

    def save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            calls.append(f)
            if len(calls) == 3:
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 14336 vs 14228")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(hf_trainer.torch, "save", save)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err, "train", "checkpoint of step 3", "full disk", "checkpoint-2")
    assert "train.resume=true" in line
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # no staging left
    assert latest_complete(ckpts).name == "checkpoint-2"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stopped"]["step"] == 3
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.setattr(hf_trainer.torch, "save", real_save)
    assert main(["train", str(cfg), "train.resume=true"]) == 0  # resumes from checkpoint-2 and finishes
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_out_of_gpu_memory_stops_with_one_line_and_a_summary(tmp_path, monkeypatch, capsys):
    """A CUDA out-of-memory in a step (a micro-batch larger than the budget allowed for) is one line
    naming the step and what to change, exit 2, a failed summary, no traceback."""
    from llamaft.train.checkpoint import AtomicCheckpointTrainer

    cfg = cli_project(tmp_path)
    real_step, calls = AtomicCheckpointTrainer.training_step, []

    def training_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.5 GiB")
        return real_step(self, *a, **k)

    monkeypatch.setattr(AtomicCheckpointTrainer, "training_step", training_step)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    line = one_error_line(err, "train", "out of GPU memory at step", "Tried to allocate 2.00 GiB", "train.micro_batch_size")
    assert "Traceback" not in err and "fast.memory_gib" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "out of GPU memory" in summary["stopped"]["reason"]


def test_an_interrupt_between_a_saves_staging_and_its_publish_leaves_no_staging(tmp_path, monkeypatch, capsys):
    """Ctrl-C / SIGTERM can land after the save itself returned, while the finished checkpoint is being
    renamed into place: the interrupted run still leaves only complete checkpoints."""
    from llamaft.train import checkpoint

    cfg = cli_project(tmp_path)
    real_publish, calls = checkpoint.publish, []

    def publish(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what the CLI's SIGTERM handler raises in the main thread
        return real_publish(src, dst)

    monkeypatch.setattr(checkpoint, "publish", publish)
    assert main(["train", str(cfg)]) == 130
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.usefixtures("one_thread")
def test_a_really_full_disk(tmp_path, capsys):
    """A real 64 KiB filesystem: the run directory fits, the first checkpoint (~124 KiB) does not."""
    from path_helpers import tiny_disk

    cfg = cli_project(tmp_path)
    with tiny_disk(tmp_path, "64k") as disk:
        capsys.readouterr()
        code = main(["train", str(cfg), f"train.output_dir={disk / 'run'}"])
        err = capsys.readouterr().err
        assert code == 2, err
        one_error_line(err, "train", str(disk / "run" / "checkpoints"), "no checkpoint was completed yet")
        left = sorted(p.name for p in (disk / "run" / "checkpoints").iterdir())
        assert left == [], left
