"""`llamaft demo --dpo` on the embedded SmolLM2 (slow): validation preference accuracy rises.

Two DPO steps on two pairs each, evaluated at the end: the concise answers of held-out questions
must be preferred (at step 0 every reward is 0, so the accuracy is 0)."""

import json

import pytest

from llamaft.demo_dpo import dpo_demo_rows, run_dpo_demo

pytestmark = pytest.mark.slow


def test_demo_pairs_are_disjoint_and_concise_is_chosen():
    rows = dpo_demo_rows()
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["concise_val"]}
    assert all(len(r["chosen"]) < len(r["rejected"]) and r["chosen"][:-1] in r["rejected"] for r in rows["train"])


def test_dpo_on_smollm2_raises_validation_preference_accuracy(tmp_path, capsys):
    # quick: two steps of two pairs, one evaluation at the end (CPU budget). At step 0 DPO's reward is 0
    # for every pair by definition (policy = reference), so the accuracy starts at 0 (the tiny-model
    # test in tests/train/test_preference.py evaluates step 0 to show it).
    run = run_dpo_demo(str(tmp_path / "demo-dpo"), steps=2, n_val=4, micro_batch_size=2, quick=True)
    # the example the demo shows is the first pair of the train split it wrote (n_val=4, not the default 8)
    first = json.loads((tmp_path / "demo-dpo-data" / "train.jsonl").read_text().splitlines()[0])
    assert f"e.g. {first['prompt']!r}" in capsys.readouterr().out
    val = json.loads((run / "summary.json").read_text())["eval"]["concise_val"]
    assert val["preference_accuracy"] >= 0.75 and val["reward_margin"] > 0, val
    assert val["logps_chosen"] > val["logps_rejected"]
