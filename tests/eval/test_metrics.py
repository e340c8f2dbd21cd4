"""Metric functions on known inputs: exact numbers, worked out by hand in the comments."""

import math

import pytest

from llamaft.errors import LlamaftError
from llamaft.eval import metrics as M


def test_normalize_lowercases_collapses_spaces_and_strips_edge_punctuation():
    assert M.normalize("  The \n Answer. ") == "the answer"
    assert M.normalize('"Paris!"') == "paris"
    assert M.normalize("U.S. policy") == "u.s. policy"  # inner punctuation stays


def test_exact_match_and_contains():
    assert M.exact_match(["The answer.", "no", "Yes!"], ["the  answer", "yes", "yes"]) == [1.0, 0.0, 1.0]
    assert M.contains(["It is Paris, France.", "London"], ["paris", "Berlin"]) == [1.0, 0.0]


def test_accuracy_and_macro_f1_with_an_unmapped_prediction():
    labels = ["relevant", "irrelevant"]
    preds = ["Relevant.", "This is IRRELEVANT", "I don't know", "relevant"]
    refs = ["relevant", "irrelevant", "relevant", "irrelevant"]
    out = M.classify(preds, refs, labels)
    assert out["labels"] == ["relevant", "irrelevant", None, "relevant"]  # whole words: not "relevant" in "irrelevant"
    assert out["accuracy"] == 0.5
    # relevant: tp=1 fp=1 fn=1 -> F1 0.5; irrelevant: tp=1 fp=0 fn=1 -> F1 2/3
    assert out["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_label_mapping_takes_the_first_named_label_and_longer_on_ties():
    assert M.map_label("Yes please", ["yes", "yes please"]) == "yes please"
    assert M.map_label("irrelevant, not relevant", ["relevant", "irrelevant"]) == "irrelevant"
    assert M.map_label("nothing here", ["relevant", "irrelevant"]) is None


def test_labels_default_to_the_references_and_bad_reference_is_a_user_error():
    scores, rows = M.compute_metrics(["accuracy", "macro_f1"], ["A", "b", "c"], ["a", "b", "b"])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    # a: tp1 -> 1.0; b: tp1 fn1 -> 2/3; c is not a label -> unmapped
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, 0.0]
    assert rows[2]["label"] is None
    with pytest.raises(LlamaftError, match="not one of the labels"):
        M.compute_metrics(["accuracy"], ["x"], ["maybe"], ["yes", "no"])


def test_missing_metric_library_is_one_clear_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)  # import fails as if not installed
    with pytest.raises(LlamaftError, match="needs the 'rouge-score' package: pip install rouge-score"):
        M.rouge_l(["a"], ["a"])


def test_rouge_l_bleu_chrf():
    # LCS 3 of 3 predicted / 6 reference tokens: P=1, R=0.5 -> F=2/3
    assert M.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == [pytest.approx(2 / 3)]
    corpus, rows = M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert corpus == pytest.approx(100.0) and rows == [pytest.approx(100.0)]
    corpus, rows = M.bleu(["xyz qqq"], ["the cat sat on the mat"])
    assert corpus == 0.0
    corpus, _ = M.chrf(["hello world"], ["hello world"])
    assert corpus == pytest.approx(100.0)


def test_compute_metrics_corpus_and_per_row():
    scores, rows = M.compute_metrics(["exact_match", "contains", "rouge_l", "bleu"], ["Paris", "it is Rome"], ["paris", "rome"])
    assert scores["exact_match"] == 0.5 and scores["contains"] == 1.0
    assert rows[0]["exact_match"] == 1.0 and rows[1]["exact_match"] == 0.0
    assert rows[1]["rouge_l"] == pytest.approx(0.5)  # LCS 1; P=1/3 R=1 -> 0.5
    assert set(rows[0]) == {"exact_match", "contains", "rouge_l", "bleu"}


def test_user_metric_float_and_dict(tmp_path, monkeypatch):
    (tmp_path / "my_metrics_ok.py").write_text(
        "def n_long(preds, refs):\n    return sum(len(p) > len(r) for p, r in zip(preds, refs))\n"
        "def both(preds, refs):\n    return {'a': 1, 'b': 0.25}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scores, _ = M.compute_metrics(["my_metrics_ok:n_long", "my_metrics_ok:both"], ["aaa", "b"], ["a", "bb"])
    assert scores == {"n_long": 1.0, "a": 1.0, "b": 0.25}


def test_user_metric_is_found_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_metric_mod.py").write_text("def one(p, r):\n    return 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert M.load_user_metric("cwd_metric_mod:one")([], []) == 1


def test_user_metric_errors(tmp_path, monkeypatch):
    (tmp_path / "my_metrics_bad.py").write_text(
        "def boom(p, r):\n    raise ValueError('nope')\n"
        "def text(p, r):\n    return 'high'\n"
    )
    (tmp_path / "my_metrics_broken.py").write_text("import not_a_real_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LlamaftError, match="expected one of exact_match"):
        M.check_metrics(["exact_matchh"])
    with pytest.raises(LlamaftError, match="cannot import 'no_such_module_abc'"):
        M.check_metrics(["no_such_module_abc:f"])
    with pytest.raises(LlamaftError, match="has no function 'missing'"):
        M.check_metrics(["my_metrics_bad:missing"])
    with pytest.raises(LlamaftError, match="not_a_real_module_xyz"):
        M.check_metrics(["my_metrics_broken:f"])
    with pytest.raises(LlamaftError, match="raised ValueError: nope"):
        M.compute_metrics(["my_metrics_bad:boom"], ["a"], ["a"])
    with pytest.raises(LlamaftError, match="returned str"):
        M.compute_metrics(["my_metrics_bad:text"], ["a"], ["a"])


def test_generation_stats_and_perplexity():
    assert M.generation_stats([True, False, True, True], [3, 8, 5, 4]) == {"stops_on_eos": 0.75, "mean_new_tokens": 5.0}
    assert M.perplexity(math.log(2.0)) == pytest.approx(2.0)
    assert M.perplexity(1e6) == float("inf")
