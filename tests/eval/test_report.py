"""report.md + plots from a synthetic run directory (metrics.jsonl, summary.json, eval results)."""

import json

from llamaft.eval.plots import set_panels
from llamaft.eval.report import metric_series, write_report


def _write_run(run, with_eval=True):
    run.mkdir()
    lines = []
    for step in range(1, 11):
        lines.append({"step": step, "epoch": step / 10, "train/loss": 3.0 - 0.2 * step, "train/learning_rate": 1e-3,
                      "train/tokens_per_s": 1000.0 + step, "train/step_time_s": 0.5, "train/mem_peak_gib": 1.5})
        if step % 5 == 0:
            lines.append({"step": step, "eval/capitals_val/loss": 2.5 - 0.1 * step, "eval/capitals_val/runtime_s": 0.5})
            lines.append({"step": step, "eval/capitals_val/perplexity": 9.0 - step, "eval/capitals_val/exact_match": step / 10,
                          "eval/capitals_val/stops_on_eos": 1.0, "eval/capitals_val/samples": 24,
                          "eval/capitals_val/prompts_truncated": 2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 11, "train/lo')  # cut last line
    (run / "summary.json").write_text(json.dumps({
        "status": "completed", "model": "tiny", "method": "lora", "train_loss": 1.0, "steps": 10, "runtime_s": 12.3,
        "trainable_params": 100, "total_params": 1000,
        "eval": {"capitals_val": {"loss": 1.5, "perplexity": 4.48, "exact_match": 1.0, "samples": 24}},
        "eval_during_training": {"note": "...", "sets": {"capitals_val": {
            "rows": 40, "loss_examples": 40, "generation_rows": 24, "note": "generation metrics on a fixed sample of 24 of 40 rows"}}},
        "throughput": {"tokens_per_s": 1234.5, "step_time_s": 0.5, "train_tokens": 6172, "steps": 10, "train_time_s": 5.0,
                       "wall_time_s": 9.0, "device": "cpu", "memory_peak_gib": 1.5, "memory_measured": "peak RSS",
                       "tokens_counted": "non-padding tokens"}}))
    if with_eval:
        (run / "eval").mkdir()
        tuned = {"capitals_val": {"loss": 0.5, "perplexity": 1.65, "exact_match": 0.9, "bleu": 80.0, "samples": 3, "prompts_truncated": 0}}
        base = {"capitals_val": {"loss": 2.0, "perplexity": 7.39, "exact_match": 0.1, "bleu": 10.0, "samples": 3, "prompts_truncated": 0}}
        (run / "eval" / "eval.json").write_text(json.dumps({"tuned": tuned, "base": base}))
        rows = [("What is the capital of Peru?", "Lima", "Lima", "The capital of Peru is Lima | a city"),
                ("Capital of Chile?", "Santiago", "Santiago", "Santiago")]
        for fname, idx in (("predictions.jsonl", 2), ("predictions_base.jsonl", 3)):
            (run / "eval" / fname).write_text("".join(json.dumps({
                "set": "capitals_val", "where": f"val.jsonl:line {i + 1}", "prompt": [{"role": "user", "content": r[0]}],
                "reference": r[1], "prediction": r[idx], "scores": {"exact_match": float(r[idx] == r[1])}}) + "\n"
                for i, r in enumerate(rows)))


def test_metric_series_keeps_finite_numbers_by_step():
    s = metric_series([{"step": 1, "train/loss": 2.0, "epoch": 0.1}, {"step": 2, "train/loss": None},
                       {"step": 2, "train/loss": 1.5, "note": "x"}])
    assert s == {"train/loss": [(1, 2.0), (2, 1.5)]}


def test_report_with_before_after(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    path = write_report(run)
    text = path.read_text()
    for png in ("loss.png", "eval_capitals_val.png", "before_after.png"):
        assert (run / "plots" / png).stat().st_size > 5000, png
        assert f"plots/{png}" in text
    assert "capitals_val exact_match: 0.1 (base) → 0.9 (fine-tuned)" in text
    assert "| capitals_val | exact_match | 0.1 | 0.9 | +0.8 ✅ |" in text
    assert "| capitals_val | loss | 2 | 0.5 | -1.5 ✅ |" in text
    assert "| exact_match | 0.5 (step 5) | 1 (step 10) | +0.5 ✅ |" in text
    assert "runtime_s" not in text  # trainer timings are not metrics
    # only the row whose answers differ is shown, with the table pipe escaped
    assert "Rows where the base and the fine-tuned model answer differently (1 shown, of 1 of 2)" in text
    assert "The capital of Peru is Lima \\| a city" in text and "Capital of Chile?" not in text
    assert "2 prompt(s) were longer than `eval.max_prompt_tokens`" in text
    assert "| train/loss (steps 1→10) | 2.8 | 1 | -1.8 ✅ |" in text


def test_report_shows_throughput_and_what_the_training_time_evaluation_was_computed_on(tmp_path):
    run = tmp_path / "run"
    _write_run(run, with_eval=False)
    text = write_report(run).read_text()
    assert (run / "plots" / "throughput.png").stat().st_size > 5000 and "plots/throughput.png" in text
    assert "| throughput | 1,234 tokens/s, 0.5 s/step (mean) |" in text
    assert "| train tokens | 6,172 in 10 steps (5.0 s of steps, 9.0 s with evaluation and checkpoints) |" in text
    assert "| memory peak | 1.50 GiB: peak RSS |" in text
    # the last evaluation during training, labelled as the sample it is, and the same words per set
    assert "| capitals_val | 1.5 | 4.48 | exact_match 1 | generation metrics on a fixed sample of 24 of 40 rows |" in text
    assert "40 rows; generation metrics on a fixed sample of 24 of 40 rows." in text


def test_a_set_with_scores_gets_one_figure_with_the_scores_together():
    series = {"eval/v/loss": [(5, 2.0)], "eval/v/perplexity": [(5, 7.4)], "eval/v/exact_match": [(5, 0.5)],
              "eval/v/bleu": [(5, 40.0)], "eval/v/mean_new_tokens": [(5, 6.0)], "eval/v/samples": [(5, 8)]}
    panels = set_panels("v", ["loss", "perplexity", "exact_match", "bleu", "mean_new_tokens", "samples"], series)
    assert panels == [("loss", {"loss": [(5, 2.0)]}), ("score (0..1)", {"exact_match": [(5, 0.5)], "bleu/100": [(5, 0.4)]}),
                      ("mean_new_tokens", {"mean_new_tokens": [(5, 6.0)]})]


def test_a_set_with_only_a_loss_gets_no_figure_of_its_own(tmp_path):
    """Its loss is in the loss plot already; a figure per set costs a few hundred ms at the end of every run."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 2, "train/loss": 2.0}, {"step": 2, "eval/only_loss/loss": 2.1}, {"step": 2, "eval/only_loss/perplexity": 8.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(run).read_text()
    assert "### only_loss" in text and "Its loss is in the loss plot above." in text
    assert not (run / "plots" / "eval_only_loss.png").exists()


def test_report_without_eval_results(tmp_path):
    run = tmp_path / "run"
    _write_run(run, with_eval=False)
    text = write_report(run).read_text()
    assert "Before vs after" not in text and not (run / "plots" / "before_after.png").exists()
    assert (run / "plots" / "loss.png").exists()


def test_report_on_an_empty_run_dir_still_writes_a_page(tmp_path):
    text = write_report(tmp_path).read_text()
    assert "No losses in metrics.jsonl" in text


def test_the_terminal_table_and_the_report_format_numbers_alike():
    from llamaft.eval.evaluate import fmt_value
    from llamaft.eval.report import _fmt

    for v in (0.123456, 4.48, 999.95, 1234.5, 12345.6, -2500.0, float("nan"), float("inf"), 24, "x"):
        assert _fmt(v) == fmt_value(v), v
    assert (fmt_value(12345.6), fmt_value(0.123456), fmt_value(None), _fmt(None)) == ("12,346", "0.1235", "-", "–")
