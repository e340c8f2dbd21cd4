"""merge / export refuse NaN/Inf weights (adapter or full model) with one line, exit 2, writing nothing."""

import argparse
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_helpers import make_run_dir
from llamaft.cli import main
from llamaft.errors import LlamaftError
from llamaft.export.cli import export_command
from llamaft.export.hf import export_hf
from llamaft.export.merge import refuse_nonfinite_model
from llamaft.model.finite import first_nonfinite, first_nonfinite_in_files, first_nonfinite_param


def _poison(weights_file, pick):
    tensors = load_file(weights_file)
    name = next(k for k in sorted(tensors) if pick in k)
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, weights_file, metadata={"format": "pt"})
    return name


@pytest.fixture(scope="module")
def nan_adapter_run(tmp_path_factory):
    run = make_run_dir(tmp_path_factory.mktemp("lora"))
    name = _poison(run / "adapter" / "adapter_model.safetensors", "lora_B")
    return run, name


@pytest.fixture(scope="module")
def nan_full_run(tmp_path_factory):
    run = make_run_dir(tmp_path_factory.mktemp("full"), method="full")
    name = _poison(run / "model" / "model.safetensors", "mlp.down_proj")
    return run, name


def test_merge_refuses_a_nan_adapter_in_one_line_exit_2(nan_adapter_run, tmp_path, capsys):
    run, name = nan_adapter_run
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0] and "NaN/Inf" in err[0] and "nothing was written" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())  # no temp dir either


def test_export_hf_refuses_nan_weights_of_adapter_and_full_runs(nan_adapter_run, nan_full_run, tmp_path):
    (lora, lora_bad), (full, full_bad) = nan_adapter_run, nan_full_run
    for path, bad in ((lora, lora_bad), (full, full_bad), (full / "model", full_bad)):  # run dirs + a model dir
        with pytest.raises(LlamaftError, match=re.escape(bad)):
            export_hf(path, tmp_path / "hf")
    assert not list(tmp_path.iterdir())


def test_export_gguf_refuses_a_nan_model_dir_before_converting(nan_full_run, tmp_path):
    args = argparse.Namespace(path=str(nan_full_run[0] / "model"), format="gguf", out=str(tmp_path / "x.gguf"),
                              dtype="bfloat16", quant="f16", ollama=False, no_check=True, push_to_hub=None,
                              private=False, max_shard_size="5GB", overwrite=False)
    with pytest.raises(LlamaftError, match="NaN/Inf"):
        export_command(args)
    assert not list(tmp_path.iterdir())


def test_float16_overflow_after_merge_is_refused():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = 1e6
    model = model.to(torch.float16)  # 1e6 > float16's 65504: Inf
    with pytest.raises(LlamaftError, match="weight weight is not finite in float16"):
        refuse_nonfinite_model(model, "float16", "somewhere")


def test_finite_helpers(tmp_path):
    a, b = torch.zeros(3), torch.tensor([1.0, float("inf")])
    assert first_nonfinite([("a", a), ("b", b)]) == "b" and first_nonfinite([("a", a)]) is None
    assert first_nonfinite([("ids", torch.arange(3))]) is None  # integer tensors cannot be NaN
    layer = torch.nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    with torch.no_grad():
        layer.bias[0] = float("nan")
    assert first_nonfinite_param(layer) == "bias" and first_nonfinite_param(layer, trainable_only=True) is None
    save_file({"ok": a, "bad": b}, tmp_path / "w.safetensors")
    assert first_nonfinite_in_files([tmp_path / "w.safetensors"]) == (tmp_path / "w.safetensors", "bad")
