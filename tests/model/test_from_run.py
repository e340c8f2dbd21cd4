"""model/from_run.py: which model.name is a llamaft run, the one-line errors for runs without final
weights, the merged base written once per adapter into the cache (staged, then renamed) and reused,
and how a run trained from another run finds its base again (or refuses a changed adapter)."""

import json
from pathlib import Path

import pytest
import yaml

from inference_helpers import make_run_dir
from llamaft.cli import main
from llamaft.config import config_from_dict
from llamaft.errors import LlamaftError
from llamaft.model.from_run import adapter_key, find_run, run_base, start_from_run
from path_helpers import hidden, one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "from-run"


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("sft"))


def _model_cfg(name, **extra):
    return config_from_dict({"model": {"name": str(name), **extra}, "data": {"train": ["x.jsonl"]}}).model


def _count_merges(monkeypatch):
    import llamaft.model.merged as merged

    calls, real = [], merged.stage_merge
    monkeypatch.setattr(merged, "stage_merge", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_what_is_a_run(sft, tmp_path):
    assert find_run(str(sft / ".." / "base")) is None  # a model directory
    assert find_run("meta-llama/Llama-3.1-8B") is None and find_run(str(tmp_path / "nothing")) is None
    start = find_run(str(sft))
    assert (start.kind, start.weights, start.key) == ("adapter", sft / "adapter", adapter_key(sft / "adapter"))
    assert find_run(str(sft / "adapter")).key == start.key  # an adapter / checkpoint dir inside a run
    full = make_run_dir(tmp_path, method="full")
    assert (find_run(str(full)).kind, find_run(str(full)).key) == ("full", None)
    model_cfg, started = start_from_run(_model_cfg(full))
    assert model_cfg.name == str(full / "model") and started["kind"] == "full"  # full weights: loaded as they are


def test_a_run_without_final_weights_is_one_line(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: x}\n")
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    with pytest.raises(LlamaftError, match=f"^model.name: {run}: training was interrupted; resume it") as err:
        find_run(str(run))
    assert "\n" not in str(err.value)


def test_the_merged_base_is_written_once_per_adapter(sft, cache, monkeypatch, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    merges = _count_merges(monkeypatch)
    cfg, started = start_from_run(_model_cfg(sft))
    assert cfg.name == started["base"] == str(cache / f"run-{adapter_key(sft / 'adapter')}")
    assert cfg.name != str(sft) and started["run"] == str(sft.resolve()) and hidden(cache) == []
    assert start_from_run(_model_cfg(sft))[0].name == cfg.name and len(merges) == 1  # reused
    other = tmp_path / "other"
    shutil.copytree(sft, other)
    weights = other / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v + 0.01 if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    again = start_from_run(_model_cfg(other))[0]
    assert again.name != cfg.name and len(merges) == 2  # a changed adapter: a new merged base
    assert not torch.equal(*(load_file(str(p / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
                             for p in (tmp_path / "cache" / "from-run").iterdir()))


def test_a_run_trained_from_a_run_finds_its_base(sft, cache, monkeypatch, tmp_path):
    import shutil

    cfg, started = start_from_run(_model_cfg(sft))
    dpo = tmp_path / "dpo"
    dpo.mkdir()
    (dpo / "summary.json").write_text(json.dumps({"started_from": started}))
    merges = _count_merges(monkeypatch)
    assert run_base(_model_cfg(sft), dpo).name == cfg.name and merges == []  # the recorded base, not rehashed
    shutil.rmtree(cfg.name)  # another machine: rebuilt from the SFT run
    assert run_base(_model_cfg(sft), dpo).name == cfg.name and len(merges) == 1
    shutil.rmtree(cfg.name)
    (dpo / "summary.json").write_text(json.dumps({"started_from": {**started, "adapter_sha256": "0" * 16}}))
    with pytest.raises(LlamaftError, match=f"^model.name: the adapter of {sft} changed since {dpo} trained from it"):
        run_base(_model_cfg(sft), dpo)


def test_a_stacked_run_finds_the_sft_base_and_refuses_a_changed_sft_adapter(sft, cache, tmp_path):
    from llamaft.model.from_run import frozen_adapter, frozen_under

    stack = _model_cfg(sft, from_run="stack")
    cfg, started = start_from_run(stack)
    assert cfg.name == str(sft.parent / "base") and started["from_run"] == "stack"  # the SFT run's own base
    assert frozen_adapter(started) == frozen_under(stack) == sft.resolve() / "adapter" and not cache.exists()
    assert frozen_adapter({**started, "from_run": "continue"}) is None and frozen_under(_model_cfg(sft)) is None
    dpo = tmp_path / "dpo"
    dpo.mkdir()
    (dpo / "summary.json").write_text(json.dumps({"started_from": started}))
    assert run_base(stack, dpo).name == cfg.name
    (dpo / "summary.json").write_text(json.dumps({"started_from": {**started, "adapter_sha256": "0" * 16}}))
    with pytest.raises(LlamaftError, match=f"^model.name: the adapter of {sft} changed since {dpo} trained from it"):
        run_base(stack, dpo)  # the new adapter was trained on that adapter's exact weights


def test_cli_errors_are_one_line(sft, tmp_path, capsys):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: x}\n")
    cfg = yaml.safe_load((sft / "config.yaml").read_text())
    cfg["model"]["name"], cfg["train"]["output_dir"], cfg["data"]["val_ratio"] = str(run), str(tmp_path / "new"), 0.0
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    one_error_line(capsys.readouterr().err, "train", f"model.name: {run}", "neither adapter/ nor model/")
    assert main(["train", str(path), f"model.name={sft}", "model.from_run=stack", "model.method=full"]) == 2
    one_error_line(capsys.readouterr().err, "train", "model.from_run: stack trains a new LoRA adapter on the frozen",
                   "use model.method lora or qlora")
    assert not (tmp_path / "new").exists()


def test_a_base_another_run_published_meanwhile_is_kept(sft, cache, monkeypatch):
    import shutil

    import llamaft.model.merged as merged

    real = merged.stage_merge

    def racing(run, out, dtype):  # another process publishes the same merge while this one stages
        staged = real(run, out, dtype)
        shutil.copytree(staged, out)
        (out / "theirs").write_text("")
        return staged

    monkeypatch.setattr(merged, "stage_merge", racing)
    cfg, _ = start_from_run(_model_cfg(sft))
    assert (Path(cfg.name) / "theirs").is_file() and hidden(cache) == []  # theirs kept, ours removed
