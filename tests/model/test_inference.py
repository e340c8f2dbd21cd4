"""model/inference.py's small shared pieces: the one run-directory test, the one dtype map, and where a
run's base is found on this machine (locate_base)."""

import pytest
import torch

from llamaft.errors import LlamaftError
from llamaft.model import load
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


def test_one_dtype_map():
    from llamaft.export import hf, merge

    assert merge.DTYPES is load.DTYPES and hf.EXPORT_DTYPES is load.DTYPES
    assert torch_dtype("float16") is torch.float16
    with pytest.raises(LlamaftError, match="not one of bfloat16, float16, float32"):
        torch_dtype("int8")


def test_a_run_names_its_base_embedded_smollm2_resolved_on_this_machine(tmp_path, monkeypatch):
    """config.yaml keeps `embedded:smollm2` (train/portable.py): each machine loads its own cache of it."""
    import shutil

    import yaml

    from inference_helpers import make_run_dir
    from llamaft.model.inference import load_for_inference

    run = make_run_dir(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.move(str(tmp_path / "base"), cache / "SmolLM2-135M-Instruct-hf")  # as prepare_smollm2 leaves it
    monkeypatch.setenv("LLAMAFT_CACHE", str(cache))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name"] = "embedded:smollm2"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    model, _, _ = load_for_inference(run, adapter=False, device="cpu")
    assert model.config.vocab_size == 262 and not hasattr(model, "peft_config")
    tuned, _, _ = load_for_inference(run, device="cpu")
    assert hasattr(tuned, "peft_config")


def test_a_moved_base_or_template_is_one_line_saying_what_to_edit(tmp_path):
    import yaml

    from inference_helpers import make_run_dir
    from llamaft.model.inference import load_for_inference

    run = make_run_dir(tmp_path)
    (tmp_path / "base").rename(tmp_path / "base-elsewhere")
    with pytest.raises(LlamaftError, match=f"model.name: {tmp_path / 'base'} not found .* set model.name in {run / 'config.yaml'}"):
        load_for_inference(run)
    (tmp_path / "base-elsewhere").rename(tmp_path / "base")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["chat_template"] = "data/tmpl.jinja"  # a copy in the run (train/portable.py) that is gone
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "data").mkdir()
    (run / "data" / "sources.json").write_text('{"data/tmpl.jinja": {"origin": "/gone/tmpl.jinja", "key": "data.chat_template"}}')
    with pytest.raises(LlamaftError, match=f"data.chat_template: {run / 'data' / 'tmpl.jinja'} not found .*a copy of /gone/tmpl.jinja"):
        load_for_inference(run)
