"""Training from a run directory (`model.name: runs/sft`, model/from_run.py), end to end on a tiny
random Llama: an SFT run, a DPO run from it (the SFT adapter merged once into a cached bf16 base,
a fresh adapter on top whose adapter-off reference is that merged model), and `llamaft merge` of the
DPO run equal to base + SFT adapter merged, then + DPO adapter merged."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from llamaft.export.merge import merge
from llamaft.model.from_run import adapter_key
from llamaft.model.inference import load_for_inference
from llamaft.train.recipe import train
from preference_helpers import model_spy, preference_config, preference_project
from train_helpers import one_torch_thread, run_config, tiny_project


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fromrun")
    quick = dict(max_steps=2, eval_every=0, save_every=0)
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setenv("LLAMAFT_CACHE", str(root / "cache"))
        sft = train(run_config(tiny_project(root / "sft"), root / "runs" / "sft", **quick))
        cfg = preference_config(preference_project(root / "pref"), root / "runs" / "dpo", **quick)
        cfg.model.name = str(sft)
        spy = model_spy()
        dpo = train(cfg, callbacks=[spy])
        merged_sft = merge(sft, root / "sft-merged", dtype="bfloat16")  # what `llamaft merge runs/sft` writes
        yield {"root": root, "sft": sft, "dpo": dpo, "model": spy.models[0], "merged_sft": merged_sft}


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


IDS = torch.tensor([[30, 31, 40, 3, 5, 12]])


def test_the_dpo_run_records_where_it_started(runs):
    sft, dpo = runs["sft"], runs["dpo"]
    assert yaml.safe_load((dpo / "config.yaml").read_text())["model"]["name"] == str(sft.resolve())
    summary = json.loads((dpo / "summary.json").read_text())
    started = summary["started_from"]
    assert summary["model"] == str(sft.resolve()) and started["run"] == str(sft.resolve())
    assert started["adapter_sha256"] == adapter_key(sft / "adapter") and started["from_run"] == "merge"
    base = runs["root"] / "cache" / "from-run" / f"sft-{started['adapter_sha256']}"
    assert started["base"] == str(base) and any(base.glob("*.safetensors"))


def test_the_base_and_reference_are_the_sft_model_merged_in_bf16(runs):
    from safetensors.torch import load_file

    base = Path(json.loads((runs["dpo"] / "summary.json").read_text())["started_from"]["base"])
    cached = load_file(str(base / "model.safetensors"))
    ours = load_file(str(runs["merged_sft"] / "model.safetensors"))
    assert cached.keys() == ours.keys() and all(torch.equal(cached[k], ours[k]) for k in ours)  # llamaft merge's bytes
    sft_model = _load(runs["merged_sft"])
    model = runs["model"]
    with torch.no_grad(), model.disable_adapter():  # the reference TRL computes: our adapter off
        reference = model(input_ids=IDS).logits
    before, _, _ = load_for_inference(runs["dpo"], adapter=False, device="cpu")  # `eval --compare-base`, the UI's base
    with torch.no_grad():
        torch.testing.assert_close(reference, sft_model(input_ids=IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(before(input_ids=IDS).logits, reference, atol=1e-5, rtol=0)
        assert not torch.allclose(model(input_ids=IDS).logits, reference, atol=1e-4)  # the DPO adapter trained


def test_merging_the_dpo_run_gives_sft_merged_then_dpo_merged(runs, tmp_path):
    from peft import PeftModel

    got = _load(merge(runs["dpo"], tmp_path / "dpo-merged", dtype="float32")).state_dict()
    expected = PeftModel.from_pretrained(_load(runs["merged_sft"]), str(runs["dpo"] / "adapter")).merge_and_unload()
    expected = expected.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-6)
    sft_only = _load(runs["merged_sft"]).state_dict()
    base = _load(runs["root"] / "sft" / "tiny-llama").state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[name], sft_only[name]) and not torch.allclose(sft_only[name], base[name], atol=1e-2)


def test_sft_continues_from_a_run_on_the_same_cached_base(runs, tmp_path):
    cfg = run_config(runs["root"] / "sft" / "tiny-llama", tmp_path / "sft2", max_steps=1, eval_every=0, save_every=0)
    cfg.model.name = str(runs["sft"])
    started = json.loads((train(cfg) / "summary.json").read_text())["started_from"]
    assert started == json.loads((runs["dpo"] / "summary.json").read_text())["started_from"]


def test_a_run_started_from_a_run_is_itself_a_start(runs, tmp_path):
    """DPO from the DPO run: its base is SFT merged, then the DPO adapter merged (what `llamaft merge` of it writes)."""
    from safetensors.torch import load_file

    from llamaft.model.from_run import start_from_run

    model_cfg, started = start_from_run(preference_config(runs["dpo"], tmp_path / "x").model)
    assert started["run"] == str(runs["dpo"].resolve()) and started["adapter_sha256"] == adapter_key(runs["dpo"] / "adapter")
    got = load_file(str(Path(model_cfg.name) / "model.safetensors"))
    want = load_file(str(merge(runs["dpo"], tmp_path / "m", dtype="bfloat16") / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
