"""train.objective and the dpo: / orpo: / simpo: sections: defaults, and one-line errors naming the key."""

import pytest

from llamaft.config import config_from_dict, load_config
from llamaft.errors import ConfigError

BASE = {"model": {"name": "m"}, "data": {"train": ["t.jsonl"]}}


def test_defaults_and_values():
    cfg = config_from_dict(BASE)
    assert cfg.train.objective == "sft" and cfg.dpo.beta == 0.1 and cfg.dpo.loss_type == "sigmoid"
    assert cfg.dpo.reference == "auto" and cfg.orpo.beta == 0.1 and (cfg.simpo.beta, cfg.simpo.gamma) == (2.0, 0.5)
    cfg = config_from_dict({**BASE, "train": {"objective": "dpo"}, "dpo": {"beta": 0.5, "loss_type": "ipo", "reference": "runs/sft/merged"}})
    assert (cfg.train.objective, cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.reference) == ("dpo", 0.5, "ipo", "runs/sft/merged")
    cfg = config_from_dict({**BASE, "train": {"objective": "simpo"}, "simpo": {"beta": 2.5, "gamma": 0}})
    assert (cfg.train.objective, cfg.simpo.beta, cfg.simpo.gamma) == ("simpo", 2.5, 0.0)


@pytest.mark.parametrize("raw, key", [
    ({"train": {"objective": "ppo"}}, "train.objective"),
    ({"dpo": {"beta": 0}}, "dpo.beta"),
    ({"dpo": {"loss_type": "kto"}}, "dpo.loss_type"),
    ({"dpo": {"label_smoothing": 0.5}}, "dpo.label_smoothing"),
    ({"dpo": {"reference": " "}}, "dpo.reference"),
    ({"orpo": {"beta": -1}}, "orpo.beta"),
    ({"simpo": {"beta": 0}}, "simpo.beta"),
    ({"simpo": {"gamma": -0.5}}, "simpo.gamma"),
    ({"simpo": {"gamma": "nan"}}, "simpo.gamma"),
    ({"model": {"name": "m", "method": "full"}, "train": {"objective": "dpo"}, "dpo": {"reference": "adapter-off"}}, "dpo.reference"),
    ({"data": {"train": ["t.jsonl"], "train_on": "all"}, "train": {"objective": "orpo"}}, "data.train_on"),
    ({"data": {"train": ["t.jsonl"], "train_on": "all"}, "train": {"objective": "simpo"}}, "data.train_on"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, **raw})
    assert f"key '{key}'" in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: m}\ndata: {train: [t.jsonl]}\ndpo: {betta: 0.2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'dpo.betta' \(did you mean 'dpo.beta'\?\)"):
        load_config(path)
    path.write_text("model: {name: m}\ndata: {train: [t.jsonl]}\n")
    assert load_config(path, ["train.objective=orpo", "orpo.beta=0.3"]).orpo.beta == 0.3
