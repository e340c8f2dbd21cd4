"""`llamaft eval` on a tiny run directory: files written, numbers recomputable from predictions.jsonl."""

import io
import json

import pytest
import yaml
from rich.console import Console

from llamaft.errors import LlamaftError
from llamaft.eval.evaluate import evaluate_run

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from inference_helpers import make_run_dir

    root = tmp_path_factory.mktemp("evalrun")
    run = make_run_dir(root)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"] = {"generation": {"*": {"metrics": ["exact_match", "contains", "chrf"], "max_new_tokens": 4, "batch_size": 2}},
                   "max_prompt_tokens": 40}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [("hi", "yo"), ("what is 2+2", "4"), ("a long question that is cut from the left", "x")]
    (root / "test.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return run


def test_eval_compare_base_writes_predictions_and_consistent_metrics(run):
    out = io.StringIO()
    res = evaluate_run(run, data=str(run.parent / "test.jsonl"), compare_base=True, console=Console(file=out, width=120))
    ev = run / "eval"
    tuned_rows = [json.loads(l) for l in (ev / "predictions.jsonl").read_text().splitlines()]
    base_rows = [json.loads(l) for l in (ev / "predictions_base.jsonl").read_text().splitlines()]
    saved = json.loads((ev / "eval.json").read_text())
    assert saved["tuned"] == json.loads(json.dumps(res["tuned"]))
    assert len(tuned_rows) == len(base_rows) == 3
    assert [r["reference"] for r in tuned_rows] == ["yo", "4", "x"]
    assert tuned_rows[0]["prompt"] == [{"role": "user", "content": "hi"}] and tuned_rows[0]["set"] == "test"
    for rows, metrics in ((tuned_rows, res["tuned"]["test"]), (base_rows, res["base"]["test"])):
        # what a user recomputes from the file equals what was reported
        assert metrics["exact_match"] == pytest.approx(sum(r["scores"]["exact_match"] for r in rows) / 3)
        assert metrics["stops_on_eos"] == pytest.approx(sum(r["stopped"] for r in rows) / 3)
        assert metrics["mean_new_tokens"] == pytest.approx(sum(r["n_tokens"] for r in rows) / 3)
        assert all(1 <= r["n_tokens"] <= 4 for r in rows)
        assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    # prompt = 23 template tokens + 1 per character (byte tokenizer): 25, 34, 64 -> only the 3rd is over 40
    assert [r["prompt_tokens"] for r in tuned_rows] == [25, 34, 64]
    assert [r["prompt_truncated"] for r in tuned_rows] == [False, False, True]
    assert res["tuned"]["test"]["prompts_truncated"] == 1
    assert res["tuned"]["test"]["loss"] != res["base"]["test"]["loss"]  # the adapter was really applied
    printed = out.getvalue()
    assert "fine-tuned" in printed and "base" in printed and "exact_match" in printed


def test_eval_errors_are_one_line(run, tmp_path):
    with pytest.raises(LlamaftError, match="no test split and no validation set|too few"):
        evaluate_run(run)
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(LlamaftError, match="plain-text rows have no reference"):
        evaluate_run(run, data=str(bad))


def test_eval_data_takes_several_files_each_a_set(run, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "sub" / "b.jsonl"
    b.parent.mkdir()
    a.write_text(json.dumps({"question": "hi", "answer": "yo"}) + "\n")
    b.write_text(json.dumps({"question": "what", "answer": "4"}) + "\n")
    res = evaluate_run(run, data=[str(a), str(b)], out=str(tmp_path / "ev"), console=Console(file=io.StringIO()))
    assert res["sets"] == {"a": 1, "b": 1}
    rows = [json.loads(l) for l in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["set"], r["reference"]) for r in rows] == [("a", "yo"), ("b", "4")]
    with pytest.raises(LlamaftError, match="--data .*a second file named 'a'"):
        evaluate_run(run, data=[str(a), str(tmp_path / "sub" / "a.jsonl")])


def test_eval_missing_run_data_names_the_original_and_data(tmp_path):
    """An older run (paths relative to where training ran) and a copy in RUN/data/ that is gone:
    one line each, naming what config.yaml says, the original, and --data."""
    from inference_helpers import make_run_dir

    run = make_run_dir(tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["validation"] = "runs/demo-data/capitals_val.jsonl"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(LlamaftError, match="^runs/demo-data/capitals_val.jsonl: file not found \\(data.validation in "
                       ".*config.yaml, relative to the directory training ran in\\); pass --data FILE"):
        evaluate_run(run)
    cfg["data"]["validation"] = "data/capitals_val.jsonl"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "data").mkdir()
    (run / "data" / "sources.json").write_text(json.dumps(
        {"data/capitals_val.jsonl": {"origin": "/home/u/capitals_val.jsonl", "key": "data.validation"}}))
    with pytest.raises(LlamaftError, match=f"^{run / 'data' / 'capitals_val.jsonl'}: file not found \\(the run's copy of "
                       "/home/u/capitals_val.jsonl \\(data.validation\\)\\); pass --data FILE"):
        evaluate_run(run)
