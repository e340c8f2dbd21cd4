"""`llamaft demo --dpo` on the embedded SmolLM2 (slow): validation preference accuracy rises.

A few DPO steps on two pairs each; the run evaluates at step 0 (the policy is the reference: reward
0, accuracy 0) and at the end, where the concise answers of held-out questions must be preferred."""

import json

import pytest

from llamaft.demo_dpo import dpo_demo_rows, run_dpo_demo

pytestmark = pytest.mark.slow


def test_demo_pairs_are_disjoint_and_concise_is_chosen():
    rows = dpo_demo_rows()
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["concise_val"]}
    assert all(len(r["chosen"]) < len(r["rejected"]) and r["chosen"][:-1] in r["rejected"] for r in rows["train"])


def test_dpo_on_smollm2_raises_validation_preference_accuracy(tmp_path):
    run = run_dpo_demo(str(tmp_path / "demo-dpo"), steps=2, n_val=4, micro_batch_size=2, gen_samples=0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = {r["step"]: r["eval/concise_val/preference_accuracy"] for r in rows if "eval/concise_val/preference_accuracy" in r}
    assert acc[0] == 0.0 and acc[2] >= 0.75, acc
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["concise_val"]["reward_margin"] > 0 and summary["status"] == "completed"
