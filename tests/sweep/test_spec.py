"""The sweep spec: every mistake is one line naming the key, before anything trains (no model, no data read)."""

import pytest

from llamaft.cli import main
from llamaft.config import config_from_dict
from llamaft.errors import ConfigError
from llamaft.sweep.spec import apply_params, parse_spec


def _base(**eval_):
    return config_from_dict({
        "model": {"name": "some/model"},
        "data": {"train": ["t.jsonl"], "validation": {"small_val": "v.jsonl", "relevance_val": "r.jsonl"}},
        "eval": eval_,
    }).model_dump(mode="json")


def _spec(space, **more):
    return {"objective": "eval/small_val/loss", "space": space, **more}


@pytest.mark.parametrize("spec, message", [
    (_spec({"train.lerning_rate": [1e-4]}), "sweep.space.train.lerning_rate: unknown config key 'train.lerning_rate' (did you mean 'train.learning_rate'?)"),
    (_spec({"lora": [1]}), "sweep.space.lora: 'lora' is a section"),
    (_spec({"lora.r": []}), "sweep.space.lora.r: empty list of values"),
    (_spec({"train.learning_rate": {"log_uniform": [5e-4, 1e-5]}}), "sweep.space.train.learning_rate: empty range [0.0005, 1e-05]"),
    (_spec({"train.learning_rate": {"log_uniform": [0, 1e-3]}}), "log_uniform needs low > 0"),
    (_spec({"train.learning_rate": {"normal": [0, 1]}}), "sweep.space.train.learning_rate: bad distribution"),
    (_spec({"train.learning_rate": 1e-4}), "sweep.space.train.learning_rate: bad distribution"),
    (_spec({"lora.r": [8, -1]}), "sweep.space.lora.r: value -1 is not valid here"),
    (_spec({"lora.alpha": {"factor_of": "lora.rr", "values": [1, 2]}}), "sweep.space.lora.alpha.factor_of: unknown config key 'lora.rr'"),
    (_spec({"train.learning_rate": {"uniform": [1e-5, 1e-3]}}, method="grid"), "method grid needs a list of values"),
    (_spec({"lora.r": [8]}, objective="eval/big_val/loss"), "sweep.objective: no validation set named 'big_val' (sets: small_val, relevance_val)"),
    (_spec({"lora.r": [8]}, objective="eval/relevance_val/accuracy"), "set 'relevance_val' logs no metric 'accuracy'"),
    (_spec({"lora.r": [8]}, objective="loss"), "sweep.objective: 'loss' is not eval/<validation set>/<metric>"),
    (_spec({"lora.r": [8]}, trials=0), "sweep.trials: expected a whole number of trials >= 1"),
    (_spec({"lora.r": [8]}, pruner="hyperband"), "sweep.pruner: expected one of median, halving, none"),
    (_spec({"lora.r": [8]}, methd="tpe"), "sweep.methd: unknown key (did you mean 'method'?)"),
    (_spec({"lora.r": [8]}, start_with=[{"lora.r": 16}]), "sweep.start_with[0].lora.r: 16 is not one of [8]"),
    (_spec({"train.output_dir": ["a", "b"]}), "sweep.space.train.output_dir: train.output_dir is set by the sweep for each trial"),
    (_spec({"lora.r": [8]}, gpus_per_trial=0), "sweep.gpus_per_trial: expected a whole number >= 1 (got 0)"),
    (_spec({"lora.r": [8]}, gpus_per_trial=3), "sweep.gpus_per_trial: 3: train.gradient_accumulation=1 does not divide among 3"),
    (_spec({"train.gradient_accumulation": [2, 3]}, gpus_per_trial=2),
     "sweep.gpus_per_trial: 2: train.gradient_accumulation=3 does not divide among 2 processes"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_spec(spec, _base(), "s.yaml")
    assert str(err.value).startswith("s.yaml: "), str(err.value)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_a_good_spec_and_the_values_it_applies():
    base = _base(generation={"relevance_val": {"metrics": ["accuracy"], "labels": ["relevant", "irrelevant"]}})
    spec = parse_spec({"objective": "eval/relevance_val/accuracy", "method": "grid", "space": {
        "lora.r": [8, 16], "lora.alpha": {"factor_of": "lora.r", "values": [1, 2]},
        "lora.target_modules": [["q_proj", "v_proj"], "all-linear"]}}, base, "s.yaml")
    assert spec.direction == "maximize" and spec.trials == 8  # the whole grid by default
    assert spec.grid() == {"lora.r": [8, 16], "lora.alpha/lora.r": [1, 2], "lora.target_modules": [0, 1]}
    raw = apply_params(base, spec.params, {"lora.r": 16, "lora.alpha/lora.r": 2, "lora.target_modules": 0})
    cfg = config_from_dict(raw)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, ["q_proj", "v_proj"])
    assert parse_spec(_spec({"lora.r": [8]}, objective="eval/small_val/loss max", timeout="30m"), base, "s").direction == "maximize"
    assert parse_spec(_spec({"lora.r": [8]}, timeout="30m"), base, "s").timeout == 1800
    held_out = dict(base, data={**base["data"], "validation": None})  # val_ratio holds out the set "validation"
    assert parse_spec(_spec({"lora.r": [8]}, objective="eval/validation/perplexity"), held_out, "s").direction == "minimize"


def test_a_preference_run_is_swept_on_its_preference_metrics():
    base = _base()
    base["train"]["objective"] = "dpo"
    spec = parse_spec(_spec({"dpo.beta": [0.05, 0.1]}, objective="eval/small_val/preference_accuracy"), base, "s")
    assert spec.direction == "maximize"
    assert parse_spec(_spec({"dpo.beta": [0.1]}, objective="eval/small_val/nll_loss"), base, "s").direction == "minimize"
    with pytest.raises(ConfigError, match="logs no metric 'perplexity'"):  # no perplexity for preference sets
        parse_spec(_spec({"dpo.beta": [0.1]}, objective="eval/small_val/perplexity"), base, "s")


def test_cli_bad_spec_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: some/model}}\ndata: {{train: [t.jsonl], validation: {{small_val: v.jsonl}}}}\n"
                   f"train: {{output_dir: {tmp_path / 'run'}}}\n"
                   "sweep:\n  objective: eval/small_val/loss\n  space: {lora.r: [8, 16], train.epoch: [1, 2]}\n")
    assert main(["sweep", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llamaft sweep: error: {cfg}: sweep.space.train.epoch: unknown config key 'train.epoch' "
                   "(did you mean 'train.epochs'?)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_the_example_spec_parses_against_the_example_config():
    from pathlib import Path

    from llamaft.config import load_config
    from llamaft.sweep.command import read_spec_file

    root = Path(__file__).resolve().parents[2]
    base = load_config(root / "configs" / "llama-3.1-8b-lora.yaml").model_dump(mode="json")
    base["data"]["validation"] = {"small_val": "data/val/small_val.jsonl"}  # the directory's sets, without the files
    spec = parse_spec(read_spec_file(root / "configs" / "sweeps" / "lr-epochs-rank.yaml"), base, "lr-epochs-rank.yaml")
    assert [p.key for p in spec.params] == ["train.learning_rate", "train.epochs", "lora.r", "lora.alpha"]
    assert spec.start_with == [{"train.learning_rate": 2e-4, "train.epochs": 2, "lora.r": 16, "lora.alpha/lora.r": 1}]


def test_pruners_and_samplers_are_optunas():
    import optuna

    from llamaft.sweep.study import pruner, sampler

    base = _base()
    halving = parse_spec(_spec({"lora.r": [8, 16]}, pruner={"halving": {"reduction_factor": 2}}), base, "s")
    assert isinstance(pruner(halving), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(sampler(halving), optuna.samplers.TPESampler)
    median = parse_spec(_spec({"lora.r": [8, 16]}, method="grid"), base, "s")
    assert isinstance(pruner(median), optuna.pruners.MedianPruner) and isinstance(sampler(median), optuna.samplers.GridSampler)
    none = parse_spec(_spec({"lora.r": [8, 16]}, method="random", pruner="none"), base, "s")
    assert isinstance(pruner(none), optuna.pruners.NopPruner) and isinstance(sampler(none), optuna.samplers.RandomSampler)


def test_the_base_config_is_read_once_with_or_without_its_sweep_section(tmp_path, monkeypatch):
    from llamaft.config import load as config_load
    from llamaft.sweep.command import load_base

    reads, real = [], config_load.read_yaml
    monkeypatch.setattr(config_load, "read_yaml", lambda p: reads.append(p) or real(p))
    run = "model: {name: some/model}\ndata: {train: [t.jsonl]}\ntrain: {output_dir: out}\n"
    for name, text, spec in (("plain.yaml", run, None), ("inline.yaml", run + "sweep: {objective: x}\n", {"objective": "x"})):
        (tmp_path / name).write_text(text)
        cfg, found = load_base(tmp_path / name, ["train.learning_rate=0.1"])
        assert (found, cfg.train.learning_rate, cfg.model.name) == (spec, 0.1, "some/model")
    assert reads == [tmp_path / "plain.yaml", tmp_path / "inline.yaml"]
