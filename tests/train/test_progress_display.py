"""train/progress_display.py: the exact text of the status, eval and closing lines."""

from llamaft.train.progress_display import Status, fmt_duration, fmt_eval, fmt_status


def test_status_line():
    s = Status(step=6, total=12, loss=0.99123, tokens_per_s=1234.4, step_time_s=3.0, eta_s=18.2, peak_bytes=int(1.2 * 2**30))
    assert fmt_status(s) == "step 6/12 · loss 0.9912 · 1,234 tok/s · 3.00 s/step · ETA 0:18 · peak 1.2 GiB"
    slow = Status(step=1, total=500, tokens_per_s=12747.0, step_time_s=41.26, eta_s=3 * 3600 + 125, peak_bytes=300 * 2**20)
    assert fmt_status(slow) == "step 1/500 · 12,747 tok/s · 41.3 s/step · ETA 3:02:05 · peak 300 MiB"
    assert fmt_status(Status(step=0, total=8)) == "step 0/8"  # nothing measured yet: nothing shown


def test_durations():
    assert [fmt_duration(s) for s in (0, 18.4, 65, 3599.6, 3600, 90061)] == ["0:00", "0:18", "1:05", "1:00:00", "1:00:00", "25:01:01"]


def test_eval_line_leaves_out_timings_and_counts_but_says_how_many_rows_were_generated():
    metrics = {"loss": 1.0231, "runtime_s": 0.5, "samples_per_second": 9.0, "perplexity": 2.7818, "exact_match": 0.375,
               "stops_on_eos": 1.0, "mean_new_tokens": 4.5, "samples": 8, "prompts_truncated": 2}
    assert fmt_eval("alpha", 6, metrics) == ("eval alpha @ step 6 · loss 1.023 · perplexity 2.782 · exact_match 0.375 · "
                                             "stops_on_eos 1 · generation on 8 rows · 2 prompts cut")
    assert fmt_eval("b_set", 2, {"loss": 4.0}) == "eval b_set @ step 2 · loss 4"


def test_memory_is_shown_in_mib_below_one_gib_and_in_gib_from_there():
    from llamaft.train.progress_display import fmt_bytes

    assert fmt_bytes(512 * 2**20) == "512 MiB" and fmt_bytes(2**30) == "1.0 GiB" and fmt_bytes(3776 * 2**20) == "3.7 GiB"
