"""model/inference.py's small shared pieces: the one run-directory test and the one dtype map."""

import pytest
import torch

from llamaft.errors import LlamaftError
from llamaft.model import load, preflight
from llamaft.model.inference import is_run_dir, torch_dtype


def test_is_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not is_run_dir(run)
    (run / "config.yaml").write_text("model: {}\n")
    assert not is_run_dir(run)  # no final weights yet
    (run / "adapter").mkdir()
    assert is_run_dir(run) and is_run_dir(str(run))
    full = tmp_path / "full"
    (full / "model").mkdir(parents=True)
    assert not is_run_dir(full)  # weights without a run config: a model directory's business
    (full / "config.yaml").write_text("model: {}\n")
    assert is_run_dir(full)
    assert "train from its weights" in preflight._run_dir_hint(str(full))
    assert "llamaft merge" in preflight._run_dir_hint(str(run))


def test_one_dtype_map():
    from llamaft.export import hf, merge

    assert merge.DTYPES is load.DTYPES and hf.EXPORT_DTYPES is load.DTYPES
    assert torch_dtype("float16") is torch.float16
    with pytest.raises(LlamaftError, match="not one of bfloat16, float16, float32"):
        torch_dtype("int8")
