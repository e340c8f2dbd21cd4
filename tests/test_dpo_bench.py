"""benchmarks/dpo_bench.py without a GPU: both tools train a tiny random Llama (Llama 3.1 vocabulary)
on the same pairs and the record has their throughput and losses; parity of the first loss (both
start at ln 2: policy = reference) checks that the two tools score the same pairs."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dpo_bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_on_cpu(tmp_path):
    out = tmp_path / "dpo.json"
    dpo_bench.main(["--layers", "1", "--hidden", "16", "--inter", "32", "--heads", "2", "--kv-heads", "1", "--steps", "2",
                    "--pairs", "4", "--batch", "2", "--prompt-words", "6", "--answer-words", "3", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert set(rec["tools"]) == {"trl", "llamaft"}
    for tool in rec["tools"].values():
        assert tool["tokens_per_s"] and tool["tokens_per_s"] > 0 and len(tool["losses"]) == 2
        assert math.isclose(tool["losses"][0], math.log(2), rel_tol=1e-4)
