"""Train a tiny random Llama with named validation sets and generation metrics, then `llamaft eval
--compare-base` and the report: the whole eval story through the real modules."""

import json

import pytest


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_train_eval_report_end_to_end(tmp_path):
    from inference_helpers import save_model_dir, tiny_model, tiny_rules, tiny_tokenizer

    from llamaft.config import config_from_dict
    from llamaft.train.callbacks import make_eval_callback
    from llamaft.eval.evaluate import evaluate_run
    from llamaft.eval.report import write_report
    from llamaft.model.tokenizer import load_tokenizer
    from llamaft.train import train

    tok = tiny_tokenizer()
    base = save_model_dir(tiny_model(), tok, tiny_rules(tok), tmp_path / "base")
    qa = [{"question": f"label {i}?", "answer": "yes" if i % 2 else "no"} for i in range(24)]
    free = [{"question": f"say {w}", "answer": w} for w in ("cat", "dog", "sun", "sea")]
    for name, rows in (("train", qa[:16]), ("cls_val", qa[16:]), ("free_val", free)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    cfg = config_from_dict({
        "model": {"name": str(base), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": [str(tmp_path / "train.jsonl")], "val_ratio": 0.0,
                 "validation": {"cls_val": str(tmp_path / "cls_val.jsonl"), "free_val": str(tmp_path / "free_val.jsonl")}},
        "train": {"output_dir": str(run), "max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-2,
                  "eval_every": 2, "save_every": 0, "report_to": []},
        "fast": {"enabled": False},
        "eval": {"generation": {"cls_val": {"metrics": ["accuracy", "macro_f1"], "labels": ["yes", "no"], "max_new_tokens": 3},
                                "free_val": {"metrics": ["exact_match", "rouge_l"], "max_new_tokens": 3, "max_samples": 2}}},
    })
    tokenizer, rules = load_tokenizer(cfg.model, cfg.data)
    cb = make_eval_callback(cfg, tokenizer, rules, metrics_path=run / "metrics.jsonl")
    train(cfg, callbacks=[cb])

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"] for r in rows if "eval/cls_val/accuracy" in r}
    assert steps == {2, 4}
    assert all(r["eval/free_val/samples"] == 2 for r in rows if "eval/free_val/samples" in r)
    assert any("eval/cls_val/loss" in r for r in rows)  # the trainer's own per-set loss, same stream

    res = evaluate_run(run, compare_base=True, max_samples=4)
    assert set(res["tuned"]) == {"cls_val", "free_val"} and set(res["base"]) == {"cls_val", "free_val"}
    assert res["tuned"]["cls_val"]["samples"] == 4 and res["tuned"]["free_val"]["samples"] == 4
    report = write_report(run).read_text()
    assert "## Before vs after" in report and "### cls_val" in report and "### free_val" in report
    assert (run / "plots" / "before_after.png").is_file() and (run / "plots" / "eval_free_val.png").is_file()
