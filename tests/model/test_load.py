"""FSDP + QLoRA at the loading-arguments level: the 4-bit base stored in the compute dtype when FSDP will
shard it (bitsandbytes is not installed on CPU CI: what reaches from_pretrained is checked instead)."""

import pytest
import torch

from llamaft.config import config_from_dict
from llamaft.model import load
from llamaft.train import setup


class Loaded(Exception):
    """Raised by the stand-in for from_pretrained / load_base once it has seen its arguments."""


def _cfg(method="qlora", **distributed):
    return config_from_dict({"model": {"name": "m", "method": method}, "data": {"train": ["t.jsonl"]},
                             "distributed": distributed})


def test_a_sharded_4bit_base_is_stored_in_the_compute_dtype():
    from transformers import BitsAndBytesConfig

    q = _cfg().quantization
    sharded = load.bnb_arguments(q, sharded=True)
    assert sharded == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                       "bnb_4bit_compute_dtype": torch.bfloat16, "bnb_4bit_quant_storage": torch.bfloat16}
    assert "bnb_4bit_quant_storage" not in load.bnb_arguments(q, sharded=False)  # one GPU: bitsandbytes' uint8
    assert load.bnb_arguments(q, sharded=True, bf16_supported=False)["bnb_4bit_quant_storage"] == torch.float16
    q.compute_dtype = "float16"
    assert load.bnb_arguments(q, sharded=True)["bnb_4bit_quant_storage"] == torch.float16
    assert BitsAndBytesConfig(**sharded).to_dict()["bnb_4bit_quant_storage"] == "bfloat16"  # what HF records


def test_load_base_hands_the_sharded_storage_to_from_pretrained(monkeypatch, tmp_path):
    seen = {}

    def from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(load, "require_bitsandbytes", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", from_pretrained)
    cfg = _cfg()
    cfg.model.name = str(tmp_path)
    for sharded, storage in ((True, torch.bfloat16), (False, torch.uint8)):
        with pytest.raises(Loaded):
            load.load_base(cfg.model, cfg.quantization, None, None, torch.bfloat16, sharded=sharded)
        assert seen["quantization_config"].bnb_4bit_quant_storage == storage


def test_the_recipe_loads_a_sharded_base_only_under_fsdp_with_several_processes(monkeypatch):
    seen = []

    def load_base(*args, sharded=False):
        seen.append(sharded)
        raise Loaded

    monkeypatch.setattr(setup, "load_base", load_base)
    for world, strategy, sharded in (("2", "fsdp", True), ("2", "ddp", False), ("2", "auto", False), ("1", "fsdp", False)):
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(Loaded):
            setup.build_model(_cfg(strategy=strategy), None, None, torch.bfloat16)
        assert seen.pop() is sharded, (world, strategy)
