"""`model.from_run: continue` and `stack` (model/from_run.py) end to end on a tiny random Llama.

continue: DPO trains an SFT run's adapter further on the SFT run's own base, against TRL's frozen "ref"
copy of that adapter (the SFT model). stack: DPO trains a NEW adapter on top of the SFT adapter kept
frozen, against the new adapter off (base + SFT adapter). Both: step 1 is ln 2 with zero rewards
(packed and padded pairs), the reference is still the SFT model after training (and after a resume),
adapter/ holds the one trained adapter and `llamaft merge` of the run is what it trained."""

import json
import math

import pytest
import torch

from llamaft.errors import LlamaftError
from llamaft.export.merge import merge
from llamaft.model.adapters import FROZEN
from llamaft.model.from_run import adapter_key, start_from_run
from llamaft.model.inference import load_for_inference
from llamaft.train.preference_fast import reference_adapters
from llamaft.train.recipe import train
from preference_helpers import model_spy, preference_config, preference_project
from train_helpers import one_torch_thread, run_config, tiny_project

IDS = torch.tensor([[30, 31, 40, 3, 5, 12]])


STACKED = ("stack_packed", "stack_padded")


def _dpo(root, sft, name, packing, mode="continue", **train_kw):
    train_kw = {"max_steps": 2, "eval_every": 0, "save_every": 0, **train_kw}
    cfg = preference_config(preference_project(root / "pref"), root / "runs" / name, **train_kw)
    cfg.model.name, cfg.model.from_run = str(sft), mode
    if mode == "stack":
        cfg.lora.r = 2  # the new adapter's (the SFT adapter's is 4): tells the two apart
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
        runs = {"root": root, "sft": sft, "packed": packed, "padded": padded, "model": spy.models[0], "models": {}}
        for name, packing in zip(STACKED, ("on", "off")):
            stack_spy = model_spy()
            runs[name] = train(_dpo(root, sft, name, packing, "stack", save_every=int(packing == "on")), callbacks=[stack_spy])
            runs["models"][name] = stack_spy.models[0]
        yield runs


def _first_step(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("step") == 1 and "train/loss" in r)


@pytest.mark.parametrize("name", ["packed", "padded", *STACKED])
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


@pytest.mark.parametrize("name, mode", [("packed", "continue"), ("stack_packed", "stack")])
def test_a_resumed_run_keeps_the_sft_adapter_as_its_reference(runs, name, mode, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("LLAMAFT_CACHE", str(runs["root"] / "cache"))
    copy = tmp_path / "resumed"
    shutil.copytree(runs[name], copy)
    cfg = _dpo(runs["root"], runs["sft"], name, "on", mode, save_every=1, max_steps=3, resume=True)
    cfg.train.output_dir = str(copy)
    if mode == "stack":  # the checkpoint's adapter was trained on the SFT adapter's exact weights
        summary = (copy / "summary.json").read_text()
        record = json.loads(summary)
        record["started_from"]["adapter_sha256"] = "0" * 16
        (copy / "summary.json").write_text(json.dumps(record))
        with pytest.raises(LlamaftError, match=f"^model.name: the adapter of {runs['sft'].resolve()} changed since"):
            train(cfg)
        (copy / "summary.json").write_text(summary)
    spy = model_spy()
    with one_torch_thread():
        train(cfg, callbacks=[spy])
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # steps 1-2 from before, 3 resumed
    step3 = next(r for r in rows if r.get("step") == 3 and "train/loss" in r)
    assert step3["train/reward_margin"] != pytest.approx(0, abs=1e-6)  # the policy is the checkpoint's, not the SFT's
    sft, _, _ = load_for_inference(runs["sft"], device="cpu", dtype="float32")
    model = spy.models[-1]
    with torch.no_grad(), reference_adapters(model):
        torch.testing.assert_close(model(input_ids=IDS).logits, sft(input_ids=IDS).logits, atol=1e-5, rtol=0)
    if mode == "stack":
        _assert_the_sft_adapter_as_trained(model, runs["sft"])


def _assert_the_sft_adapter_as_trained(model, sft):
    """The stacked model's frozen adapter: the SFT run's tensors exactly, never trainable."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    trained = load_file(sft / "adapter" / "adapter_model.safetensors")
    frozen = get_peft_model_state_dict(model, adapter_name=FROZEN)
    assert frozen.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(frozen[key], value), key
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{FROZEN}." in n)
    assert model.active_adapters == ["default", FROZEN]


@pytest.mark.parametrize("name", STACKED)
def test_stacked_reference_is_base_plus_sft_adapter_and_that_adapter_never_trains(runs, name):
    from llamaft.model.adapters import frozen_only

    model = runs["models"][name]
    sft, _, _ = load_for_inference(runs["sft"], device="cpu", dtype="float32")
    with torch.no_grad():
        want = sft(input_ids=IDS).logits
        with sft.disable_adapter():  # the base alone: a reference with every adapter off would be this
            assert (sft(input_ids=IDS).logits - want).abs().max() > 1e-3
        with frozen_only(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
        assert not torch.allclose(model(input_ids=IDS).logits, want, atol=1e-4)  # both adapters on; the new one trained
    _assert_the_sft_adapter_as_trained(model, runs["sft"])


def test_a_stacked_run_records_its_start_and_saves_only_its_new_adapter(runs):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    sft, run = runs["sft"], runs["stack_packed"]
    started = json.loads((run / "summary.json").read_text())["started_from"]
    assert started["from_run"] == "stack" and started["adapter_sha256"] == adapter_key(sft / "adapter")
    assert started["base"] == str(runs["root"] / "sft" / "tiny-llama")  # the SFT run's own base: nothing merged
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2  # this run's lora.r
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    new = get_peft_model_state_dict(runs["models"]["stack_packed"], adapter_name="default")
    assert saved.keys() == new.keys() and all(torch.equal(saved[k], new[k]) for k in saved)
    assert not [p for p in (run / "adapter").iterdir() if p.is_dir()]
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and not any((c / FROZEN).exists() for c in checkpoints)  # rebuilt from the SFT run at each start


def test_loading_or_merging_a_stacked_run_is_base_plus_sft_adapter_plus_its_own(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["stack_packed"]
    base = AutoModelForCausalLM.from_pretrained(str(runs["root"] / "sft" / "tiny-llama"), dtype=torch.float32)
    want = PeftModel.from_pretrained(base, str(runs["sft"] / "adapter"), adapter_name="sft")
    want.load_adapter(str(run / "adapter"), "new")
    loaded, _, _ = load_for_inference(run, device="cpu", dtype="float32")  # what chat / eval / export / merge load
    merged = AutoModelForCausalLM.from_pretrained(str(merge(run, tmp_path / "m", dtype="float32")))
    with torch.no_grad():
        want.base_model.set_adapter(["new"])
        without_sft = want(input_ids=IDS).logits
        want.base_model.set_adapter(["sft", "new"])
        expected = want(input_ids=IDS).logits
        assert (expected - without_sft).abs().max() > 1e-3
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


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


def test_sft_stacks_a_new_adapter_with_this_configs_lora_settings(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFT_CACHE", str(runs["root"] / "cache"))
    cfg = run_config(runs["root"] / "sft" / "tiny-llama", tmp_path / "run", max_steps=1, eval_every=0, save_every=0)
    cfg.model.name, cfg.model.from_run, cfg.lora.r = str(runs["sft"]), "stack", 8
    spy = model_spy()
    with one_torch_thread():
        run = train(cfg, callbacks=[spy])
    assert json.loads((run / "summary.json").read_text())["started_from"]["from_run"] == "stack"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8  # lora.r, not the SFT adapter's 4
    _assert_the_sft_adapter_as_trained(spy.models[0], runs["sft"])
