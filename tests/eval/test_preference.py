"""`llamaft eval` on a DPO run: per-set preference metrics, and with --compare-base the DPO reward
against the base, equal to what TRL's DPOTrainer reported for the same pairs at the end of training."""

import json
import math

import pytest

from llamaft.eval.evaluate import evaluate_run
from llamaft.eval.preference import pair_metrics, reward_metrics
from llamaft.train.recipe import train
from preference_helpers import preference_config, preference_project

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_by_hand():
    tuned = [(-2.0, -9.0, 2, 6), (-4.0, -3.0, 4, 1), (-1.0, -6.0, 1, 3)]
    base = [(-3.0, -8.0, 2, 6), (-4.0, -2.0, 4, 1), (-2.0, -5.0, 1, 3)]
    m = pair_metrics(tuned)
    # per token: -1 > -1.5, -1 > -3, -1 > -2: all chosen preferred (a sum would call row 2 rejected)
    assert m == {"chosen_preferred": 1.0, "logps_chosen": -7 / 3, "logps_rejected": -6.0}
    r = reward_metrics(tuned, base, beta=0.5)
    assert r["preference_accuracy"] == 1.0 and math.isclose(r["reward_margin"], 0.5 * (2 + 1 + 2) / 3)


def test_eval_of_a_dpo_run_matches_trl_and_compares_base(tmp_path):
    model_dir = preference_project(tmp_path)
    run = train(preference_config(model_dir, tmp_path / "run", max_steps=8, eval_every=0, save_every=0))
    trl_val = json.loads((run / "summary.json").read_text())["eval"]["val"]
    result = evaluate_run(run, compare_base=True)
    tuned, base = result["tuned"]["val"], result["base"]["val"]
    # Same pairs, same weights (merged here, adapter on in training), same reward definition as TRL's.
    assert tuned["preference_accuracy"] == trl_val["preference_accuracy"]
    assert math.isclose(tuned["reward_margin"], trl_val["reward_margin"], rel_tol=1e-3, abs_tol=1e-5)
    assert math.isclose(tuned["logps_chosen"], trl_val["logps_chosen"], rel_tol=1e-4)
    assert tuned["chosen_preferred"] > base["chosen_preferred"]
    assert "preference_accuracy" not in base and "_pair_logps" not in tuned  # the reward needs a reference
    saved = json.loads((run / "eval" / "eval.json").read_text())
    assert saved["tuned"]["val"]["reward_margin"] == tuned["reward_margin"]
