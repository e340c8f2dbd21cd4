"""`model.from_run: continue` (model/from_run.py): DPO that trains an SFT run's adapter further on the
SFT run's own base, against TRL's frozen "ref" copy of that adapter (the SFT model), end to end on a
tiny random Llama: step 1 is ln 2 with zero rewards (packed and padded pairs), the reference is still
the SFT model after training, adapter/ holds the one trained adapter and `llamaft merge` of the run is
the SFT run's base + that adapter."""

import json
import math

import pytest
import torch

from llamaft.errors import LlamaftError
from llamaft.export.merge import merge
from llamaft.model.from_run import adapter_key, start_from_run
from llamaft.model.inference import load_for_inference
from llamaft.train.recipe import train
from preference_helpers import model_spy, preference_config, preference_project
from train_helpers import one_torch_thread, run_config, tiny_project

IDS = torch.tensor([[30, 31, 40, 3, 5, 12]])


def _dpo(root, sft, name, packing, **train_kw):
    train_kw = {"max_steps": 2, "eval_every": 0, "save_every": 0, **train_kw}
    cfg = preference_config(preference_project(root / "pref"), root / "runs" / name, **train_kw)
    cfg.model.name, cfg.model.from_run = str(sft), "continue"
    return cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"preference_packing": packing})})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("continue")
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setenv("LLAMAFT_CACHE", str(root / "cache"))
        sft = train(run_config(tiny_project(root / "sft"), root / "runs" / "sft", max_steps=2, eval_every=0, save_every=0))
        spy = model_spy()
        packed = train(_dpo(root, sft, "packed", "on", save_every=1), callbacks=[spy])
        padded = train(_dpo(root, sft, "padded", "off"))
        yield {"root": root, "sft": sft, "packed": packed, "padded": padded, "model": spy.models[0]}


def _first_step(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("step") == 1 and "train/loss" in r)


@pytest.mark.parametrize("name", ["packed", "padded"])
def test_step_one_is_ln2_policy_and_reference_both_the_sft_model(runs, name):
    first = _first_step(runs[name])
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    # rewards = beta * (policy - reference) log-probs, per side: zero only when the reference is the SFT adapter
    assert first["train/reward_chosen"] == pytest.approx(0, abs=1e-5)
    assert first["train/reward_rejected"] == pytest.approx(0, abs=1e-5)
    assert first["train/logps_chosen"] == pytest.approx(_first_step(runs["padded"])["train/logps_chosen"], abs=1e-4)


def test_the_reference_stays_the_sft_model_and_the_policy_trains(runs):
    from trl.trainer.utils import use_adapter

    sft, _, _ = load_for_inference(runs["sft"], device="cpu", dtype="float32")
    model = runs["model"]
    with torch.no_grad():
        want = sft(input_ids=IDS).logits
        with use_adapter(model, "ref"):
            torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
        assert not torch.allclose(model(input_ids=IDS).logits, want, atol=1e-4)  # the continued adapter trained


def test_the_run_records_its_start_and_saves_one_adapter(runs):
    sft, run = runs["sft"], runs["packed"]
    started = json.loads((run / "summary.json").read_text())["started_from"]
    assert started["from_run"] == "continue" and started["run"] == str(sft.resolve())
    assert started["adapter_sha256"] == adapter_key(sft / "adapter")
    assert started["base"] == str(runs["root"] / "sft" / "tiny-llama")  # the SFT run's own base: nothing merged
    assert not (runs["root"] / "cache" / "from-run").exists()
    assert not (run / "adapter" / "ref").exists() and len(list((run / "adapter").glob("*.safetensors"))) == 1
    assert adapter_key(run / "adapter") != adapter_key(sft / "adapter")
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and not any((c / "ref").exists() for c in checkpoints)  # TRL's copy is rebuilt at each start


def test_a_resumed_run_keeps_the_sft_adapter_as_its_reference(runs, tmp_path, monkeypatch):
    import shutil

    from trl.trainer.utils import use_adapter

    monkeypatch.setenv("LLAMAFT_CACHE", str(runs["root"] / "cache"))
    copy = tmp_path / "resumed"
    shutil.copytree(runs["packed"], copy)
    cfg = _dpo(runs["root"], runs["sft"], "packed", "on", save_every=1, max_steps=3, resume=True)
    cfg.train.output_dir = str(copy)
    spy = model_spy()
    with one_torch_thread():
        train(cfg, callbacks=[spy])
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # steps 1-2 from before, 3 resumed
    step3 = next(r for r in rows if r.get("step") == 3 and "train/loss" in r)
    assert step3["train/reward_margin"] != pytest.approx(0, abs=1e-6)  # the policy is the checkpoint's, not the SFT's
    sft, _, _ = load_for_inference(runs["sft"], device="cpu", dtype="float32")
    model = spy.models[-1]
    with torch.no_grad(), use_adapter(model, "ref"):
        torch.testing.assert_close(model(input_ids=IDS).logits, sft(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_merging_the_run_is_the_sft_base_plus_its_adapter(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(str(merge(runs["packed"], tmp_path / "m", dtype="float32"))).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(runs["root"] / "sft" / "tiny-llama"), dtype=torch.float32)
    want = PeftModel.from_pretrained(base, str(runs["packed"] / "adapter")).merge_and_unload().state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)


def test_continue_takes_the_sft_adapters_own_lora_settings_and_says_so(runs, capsys):
    from llamaft.model.adapters import apply_adapters
    from llamaft.model.from_run import continued_adapter
    from transformers import AutoModelForCausalLM

    cfg = _dpo(runs["root"], runs["sft"], "unused", "off")
    cfg.lora.r = 16  # not the SFT adapter's r=4: does not apply
    model_cfg, started = start_from_run(cfg.model)
    base = AutoModelForCausalLM.from_pretrained(model_cfg.name)
    model = apply_adapters(base, model_cfg, cfg.lora, continued_adapter(started))
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].inference_mode is False
    assert "lora: continuing the adapter" in capsys.readouterr().out
    with pytest.raises(LlamaftError, match="model.from_run: continue trains the LoRA adapter"):
        start_from_run(cfg.model.model_copy(update={"method": "full"}))


@pytest.mark.parametrize("objective", ["sft", "orpo"])
def test_sft_and_orpo_train_the_adapter_further(runs, objective, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFT_CACHE", str(runs["root"] / "cache"))
    if objective == "sft":
        cfg = run_config(runs["root"] / "sft" / "tiny-llama", tmp_path / "run", max_steps=1, eval_every=0, save_every=0)
        cfg.model.name, cfg.model.from_run = str(runs["sft"]), "continue"
    else:
        cfg = _dpo(runs["root"], runs["sft"], "orpo", "off", max_steps=1, objective="orpo")
        cfg.train.output_dir = str(tmp_path / "run")
    cfg.lora.r = 8  # does not apply: the SFT adapter keeps its r=4
    with one_torch_thread():
        run = train(cfg)
    assert json.loads((run / "summary.json").read_text())["started_from"]["from_run"] == "continue"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4  # the SFT adapter's, not lora.r
    assert adapter_key(run / "adapter") != adapter_key(runs["sft"] / "adapter")
