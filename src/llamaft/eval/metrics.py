"""Metrics over generated text: pure functions of (predictions, references), corpus score + per-row scores.

    scores, per_row = compute_metrics(["exact_match", "rouge_l", "mymetrics:score"], preds, refs)
    scores["exact_match"]            # 0..1
    per_row[0]["rouge_l"]            # the first row's own score

Scales follow the libraries people compare with: exact_match, contains, accuracy, macro_f1, rouge_l are
0..1; bleu and chrf are sacrebleu's 0..100.

Definitions (so anyone can recompute them from predictions.jsonl):

- ``normalize``: lowercase, collapse every run of whitespace to one space, strip, then strip
  punctuation (``string.punctuation``) and whitespace at both ends. ``"  The  Answer. "`` -> ``"the answer"``.
- ``exact_match``: normalize(pred) == normalize(ref).
- ``contains``: normalize(ref) occurs in normalize(pred) (an empty reference counts as contained).
- ``accuracy`` / ``macro_f1`` over a label set: each prediction maps to the label whose normalised text
  occurs *first* in the normalised prediction as a whole word/phrase (ties at the same position go to the
  longer label, so "not relevant" beats "relevant"); a prediction naming no label is *unmapped*: it is
  wrong for accuracy and, for macro-F1, a class of its own that is never averaged (it lowers the recall of
  the true class). References must normalise to a label exactly. Default label set: the distinct
  normalised references. macro_f1 = mean F1 over the labels that occur in the references or the mapped
  predictions (sklearn's ``f1_score(average="macro")`` over those labels).
- ``rouge_l``: rouge-score ROUGE-L F-measure (its default tokenizer, no stemming), mean over rows.
- ``bleu`` / ``chrf``: sacrebleu corpus BLEU / chrF with one reference per row; the per-row scores are
  sentence-level, so their mean differs from the corpus score (that is how BLEU is defined).
- ``module:function``: a user function ``f(predictions, references) -> float | dict[str, float]``; a float
  is reported under the function's name, a dict's keys are reported as they are. No per-row score.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re
import string
import sys
from typing import Callable

from ..errors import LlamaftError

BUILTIN = ("exact_match", "contains", "accuracy", "macro_f1", "rouge_l", "bleu", "chrf")
LABEL_METRICS = ("accuracy", "macro_f1")
UNMAPPED = None  # a prediction that names no label

_WS = re.compile(r"\s+")
_EDGE = string.punctuation + " "


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace, strip punctuation and spaces at both ends."""
    return _WS.sub(" ", str(text).lower()).strip().strip(_EDGE)


def exact_match(predictions: list[str], references: list[str]) -> list[float]:
    return [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)]


def contains(predictions: list[str], references: list[str]) -> list[float]:
    return [float(normalize(r) in normalize(p)) for p, r in zip(predictions, references)]


# ---------------------------------------------------------------------------------------------
# Classification over a label set


def map_label(prediction: str, labels: list[str]) -> str | None:
    """The label named first in the prediction (whole words; longer label on ties), or None."""
    text = normalize(prediction)
    best: tuple[int, int] | None = None
    found = None
    for label in labels:
        norm = normalize(label)
        if not norm:
            continue
        # (?<!\w)...(?!\w): whole-word match, so "relevant" is not found inside "irrelevant".
        m = re.search(r"(?<!\w)" + re.escape(norm) + r"(?!\w)", text)
        if m and (best is None or (m.start(), -len(norm)) < best):
            best, found = (m.start(), -len(norm)), label
    return found


def _reference_labels(references: list[str], labels: list[str] | None) -> tuple[list[str], list[str]]:
    """(label set, each reference's label); references outside a given label set are a user error."""
    if not labels:
        labels = sorted({normalize(r) for r in references})
    by_norm = {normalize(label): label for label in labels}
    ref_labels = []
    for i, r in enumerate(references):
        if normalize(r) not in by_norm:
            raise LlamaftError(f"eval: reference {i + 1} ({r[:60]!r}) is not one of the labels {labels}; "
                               "fix eval.generation.<set>.labels or the data")
        ref_labels.append(by_norm[normalize(r)])
    return list(labels), ref_labels


def classify(predictions: list[str], references: list[str], labels: list[str] | None = None) -> dict:
    """accuracy, macro_f1 and the per-row mapped labels (None = unmapped)."""
    labels, ref_labels = _reference_labels(references, labels)
    pred_labels = [map_label(p, labels) for p in predictions]
    correct = [float(p == r) for p, r in zip(pred_labels, ref_labels)]
    present = [label for label in labels if label in ref_labels or label in pred_labels]
    f1s = []
    for label in present:
        tp = sum(1 for p, r in zip(pred_labels, ref_labels) if p == label and r == label)
        fp = sum(1 for p, r in zip(pred_labels, ref_labels) if p == label and r != label)
        fn = sum(1 for p, r in zip(pred_labels, ref_labels) if p != label and r == label)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "accuracy": _mean(correct),
        "macro_f1": _mean(f1s),
        "rows": correct,
        "labels": pred_labels,
    }


# ---------------------------------------------------------------------------------------------
# Text overlap (kept libraries)


def _require(module: str, package: str, metric: str):
    """Import a metric's library, or one clear line naming the package (it is a llamaft dependency,
    but an environment can lack it, e.g. a GPU image with --no-deps installs)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LlamaftError(f"eval metric '{metric}' needs the '{package}' package: pip install {package}") from None


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score", "rouge_l")

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def bleu(predictions: list[str], references: list[str]) -> tuple[float, list[float]]:
    sacrebleu = _require("sacrebleu", "sacrebleu", "bleu")

    corpus = sacrebleu.corpus_bleu(predictions, [references]).score
    rows = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)]
    return corpus, rows


def chrf(predictions: list[str], references: list[str]) -> tuple[float, list[float]]:
    sacrebleu = _require("sacrebleu", "sacrebleu", "chrf")

    corpus = sacrebleu.corpus_chrf(predictions, [references]).score
    rows = [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(predictions, references)]
    return corpus, rows


# ---------------------------------------------------------------------------------------------
# User metrics


def load_user_metric(spec: str) -> Callable:
    """Import `module:function`; the current directory is searched too (the `llamaft` script omits it)."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        close = difflib.get_close_matches(spec, BUILTIN, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise LlamaftError(f"eval metric '{spec}': {hint}expected one of {', '.join(BUILTIN)} or module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise LlamaftError(f"eval metric '{spec}': cannot import '{module_name}': {err}") from None
        sys.path.insert(0, os.getcwd())
        return load_user_metric(spec)
    except Exception as err:  # the user's module raised while importing
        raise LlamaftError(f"eval metric '{spec}': importing '{module_name}' failed: {type(err).__name__}: {err}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise LlamaftError(f"eval metric '{spec}': module '{module_name}' has no function '{func_name}'")
    return func


def check_metrics(names: list[str], labels: list[str] | None = None) -> None:
    """Fail before any model loads: unknown names, unimportable user metrics."""
    for name in names:
        if name not in BUILTIN:
            load_user_metric(name)


def _user_metric(spec: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    func = load_user_metric(spec)
    try:
        value = func(list(predictions), list(references))
    except Exception as err:
        raise LlamaftError(f"eval metric '{spec}' raised {type(err).__name__}: {err}") from None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[str(k)] = _number(spec, v)
        return out
    return {spec.partition(":")[2]: _number(spec, value)}


def _number(spec: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LlamaftError(f"eval metric '{spec}' returned {type(value).__name__}; expected a number or a dict of numbers") from None


# ---------------------------------------------------------------------------------------------


def compute_metrics(names: list[str], predictions: list[str], references: list[str],
                    labels: list[str] | None = None) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Corpus scores {name: value} and one {name: score} dict per row (user metrics: corpus only)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scores: dict[str, float] = {}
    per_row: list[dict[str, float]] = [{} for _ in predictions]

    def put(name: str, rows: list[float], corpus: float | None = None) -> None:
        scores[name] = _mean(rows) if corpus is None else corpus
        for d, v in zip(per_row, rows):
            d[name] = v

    simple = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l}
    corpus_level = {"bleu": bleu, "chrf": chrf}
    cls = None
    for name in names:
        if name in simple:
            put(name, simple[name](predictions, references))
        elif name in corpus_level:
            corpus, rows = corpus_level[name](predictions, references)
            put(name, rows, corpus)
        elif name in LABEL_METRICS:
            cls = cls or classify(predictions, references, labels)
            if name == "accuracy":
                put(name, cls["rows"])
            else:
                scores[name] = cls["macro_f1"]
            for d, label in zip(per_row, cls["labels"]):
                d["label"] = label  # which label the prediction was read as (None = unmapped)
        else:
            scores.update(_user_metric(name, predictions, references))
    return scores, per_row


def generation_stats(stopped: list[bool], n_tokens: list[int]) -> dict[str, float]:
    """Always reported: share of generations that ended on a stop token, and mean generated length."""
    return {"stops_on_eos": _mean([float(s) for s in stopped]), "mean_new_tokens": _mean([float(n) for n in n_tokens])}


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows (a diverged run must not crash the logger)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
