"""Prompt/reference extraction, left truncation (counted), fixed sampling, stop-on-EOS share, and the
training callback's eval/<set>/<metric> logging, with a fake generator and a tiny random Llama."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from llamaft.config import EvalConfig, GenerationEvalConfig
from llamaft.errors import LlamaftError
from llamaft.eval import generation as G
from llamaft.eval.generation import check_generation_sets
from llamaft.train.callbacks import GenerationEvalCallback

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]

pytestmark = pytest.mark.usefixtures("one_thread")



def test_prompt_is_everything_before_the_last_assistant_turn():
    prompt, ref = G.split_conversation(CONV)
    assert prompt == CONV[:4] and ref == "6"
    with pytest.raises(LlamaftError, match="no assistant turn"):
        G.split_conversation([{"role": "user", "content": "hi"}], "f.jsonl:line 3")
    with pytest.raises(LlamaftError, match="f.jsonl:line 3"):
        G.split_conversation([{"role": "assistant", "content": "hi"}], "f.jsonl:line 3")


def test_truncate_left_keeps_the_end_and_bos():
    assert G.truncate_left([9, 1, 2, 3, 4, 5], 4, bos_id=9) == ([9, 3, 4, 5], True)
    assert G.truncate_left([1, 2, 3, 4, 5], 2, bos_id=9) == ([4, 5], True)
    assert G.truncate_left([9, 1, 2], 3, bos_id=9) == ([9, 1, 2], False)


def test_sample_is_fixed_and_keeps_file_order():
    rows = list(range(100))
    a, b = G.sample_rows(rows, 10), G.sample_rows(rows, 10)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert G.sample_rows(rows[:5], 10) == rows[:5]
    assert G.sample_rows(rows, None) == rows


def _fake_prompt_ids(messages, tokenizer, rules, tools=None):
    """BOS (99) + one id per character of every message: lengths are easy to reason about."""
    return [99] + [ord(c) for m in messages for c in m["content"]]


def _fake_generate(replies):
    def generate(model, tokenizer, rules, prompts, gen_cfg):
        generate.prompts = prompts
        return [SimpleNamespace(text=t, stopped=s, n_tokens=n) for t, s, n in replies]
    return generate


def test_generation_metrics_counts_truncation_and_stop_share(monkeypatch):
    monkeypatch.setattr(G, "prompt_ids", _fake_prompt_ids)
    convs = [
        {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "Yes"}], "where": "r1"},
        {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "no"}], "where": "r2"},
        {"messages": CONV, "where": "r3"},
    ]
    gen = _fake_generate([("yes.", True, 2), ("No way", False, 8), ("7", True, 2)])
    tok = SimpleNamespace(bos_token_id=99)
    cfg = GenerationEvalConfig(metrics=["exact_match", "contains"], max_samples=10)
    metrics, rows = G.generation_metrics(None, tok, None, convs, cfg, EvalConfig(max_prompt_tokens=20), generate=gen)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["contains"] == pytest.approx(2 / 3)
    assert metrics["stops_on_eos"] == pytest.approx(2 / 3)
    assert metrics["mean_new_tokens"] == pytest.approx(4.0)
    # prompt lengths before the cut: r1 1+5=6; r2 1+50=51; r3 1+9+4+1+8=23 (last assistant turn excluded)
    assert [r["prompt_tokens"] for r in rows] == [6, 51, 23]
    assert metrics["samples"] == 3 and metrics["prompts_truncated"] == 2
    assert [r["prompt_truncated"] for r in rows] == [False, True, True]
    assert [len(p) for p in gen.prompts] == [6, 20, 20]
    assert gen.prompts[1] == [99] + [ord("x")] * 19  # BOS kept, the end of the prompt kept
    assert gen.prompts[2][-3:] == [ord(c) for c in "3+3?"][-3:]
    assert rows[0] == {"where": "r1", "prompt": [{"role": "user", "content": "short"}], "reference": "Yes",
                       "prediction": "yes.", "scores": {"exact_match": 1.0, "contains": 1.0}, "stopped": True,
                       "n_tokens": 2, "prompt_tokens": 6, "prompt_truncated": False}


def test_generation_set_names_are_checked():
    ev = EvalConfig(generation={"qa": GenerationEvalConfig()})
    with pytest.raises(LlamaftError, match="no validation set named 'qa'"):
        check_generation_sets(ev, ["cls", "free"])
    ev = EvalConfig(generation={"*": GenerationEvalConfig(metrics=["rouge_l"]), "cls": GenerationEvalConfig(metrics=["accuracy"])})
    plan = check_generation_sets(ev, ["cls", "free"])
    assert plan["cls"].metrics == ["accuracy"] and plan["free"].metrics == ["rouge_l"]


def _args_state(tmp_path, step=7):
    from transformers import TrainerControl, TrainerState

    state = TrainerState()
    state.global_step = step
    return SimpleNamespace(output_dir=str(tmp_path)), state, TrainerControl()


def test_callback_logs_per_set_metrics_with_fake_generation(monkeypatch, tmp_path):
    monkeypatch.setattr(G, "prompt_ids", _fake_prompt_ids)
    sets = {
        "cls": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "relevant"}]}] * 2,
        "free": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}]}],
    }
    ev = EvalConfig(generation={"cls": GenerationEvalConfig(metrics=["accuracy"], labels=["relevant", "irrelevant"])})
    model = torch.nn.Linear(2, 2)
    model.train()
    seen_training = []

    def gen(m, *a):
        seen_training.append(m.training)
        return [SimpleNamespace(text="Relevant", stopped=True, n_tokens=2), SimpleNamespace(text="irrelevant!", stopped=False, n_tokens=4)]

    cb = GenerationEvalCallback(ev, SimpleNamespace(bos_token_id=99), None, sets, generate=gen)
    args, state, control = _args_state(tmp_path)
    cb.on_evaluate(args, state, control, metrics={"eval_cls_loss": math.log(3.0), "eval_cls_runtime": 1.0}, model=model)
    cb.on_evaluate(args, state, control, metrics={"eval_free_loss": 0.0}, model=model)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 7
    assert lines[0]["eval/cls/perplexity"] == pytest.approx(3.0)
    assert lines[0]["eval/cls/accuracy"] == 0.5 and lines[0]["eval/cls/stops_on_eos"] == 0.5
    assert lines[0]["eval/cls/mean_new_tokens"] == 3.0 and lines[0]["eval/cls/samples"] == 2
    assert lines[1] == {"step": 7, "eval/free/perplexity": 1.0}  # no generation configured for 'free'
    assert seen_training == [False] and model.training  # eval mode while generating, train mode restored


def test_callback_runs_real_generation_on_a_tiny_model_inside_a_trainer(tmp_path):
    """A real HF Trainer: 2 steps, evaluation on two named sets, logged through trainer.log."""
    from inference_helpers import tiny_model, tiny_rules, tiny_tokenizer
    from transformers import Trainer, TrainingArguments

    from llamaft.train.callbacks import make_eval_callback

    tok = tiny_tokenizer()
    rules = tiny_rules(tok)
    model = tiny_model()
    conv = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    cfg = SimpleNamespace(eval=EvalConfig(generation={"*": GenerationEvalConfig(metrics=["exact_match", "chrf"], max_new_tokens=3, max_samples=2)}),
                          train=SimpleNamespace(objective="sft"))  # sft sets are scored with perplexity too
    ex = {"input_ids": [256, 104, 105, 257], "labels": [256, 104, 105, 257]}
    data = [dict(ex) for _ in range(4)]

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "labels")}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, eval_strategy="steps",
                             eval_steps=2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset={"a": data[:2], "b": data[:2]}, data_collator=collate)
    cb = make_eval_callback(cfg, tok, rules, log=trainer.log, sets={"a": conv, "b": conv})
    trainer.add_callback(cb)
    trainer.train()
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    for s in ("a", "b"):
        for m in ("perplexity", "exact_match", "chrf", "stops_on_eos", "mean_new_tokens", "samples", "prompts_truncated"):
            assert f"eval_{s}_{m}" in logged, (s, m)  # HF spelling; metrics.jsonl renames to eval/<set>/<metric>
        assert logged[f"eval_{s}_perplexity"] == pytest.approx(math.exp(logged[f"eval_{s}_loss"]))
        assert logged[f"eval_{s}_samples"] == 2
        assert 1 <= logged[f"eval_{s}_mean_new_tokens"] <= 3


def test_batched_left_padded_generation_equals_one_by_one():
    """Same predictions whether prompts of different lengths share a left-padded batch or run alone."""
    from inference_helpers import tiny_model, tiny_rules, tiny_tokenizer

    tok = tiny_tokenizer()
    rules, model = tiny_rules(tok), tiny_model()
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "a"}]}
             for q in ("hi", "a much longer question here", "mid length q")]
    rows = {}
    for bs in (1, 3):
        cfg = GenerationEvalConfig(metrics=["exact_match"], max_new_tokens=6, batch_size=bs)
        _, rows[bs] = G.generation_metrics(model, tok, rules, convs, cfg, EvalConfig())
    assert [r["prediction"] for r in rows[1]] == [r["prediction"] for r in rows[3]]
    assert [r["n_tokens"] for r in rows[1]] == [r["n_tokens"] for r in rows[3]]


def test_logged_keys_become_slash_names_in_metrics_jsonl():
    """Our keys go through trainer.log in HF spelling; the metrics.jsonl renamer maps them back."""
    from llamaft.train.callbacks import hf_key

    callbacks = pytest.importorskip("llamaft.train.callbacks")
    keys = {hf_key(f"eval/{s}/{m}"): 1.0 for s in ("cls_val", "cls") for m in ("accuracy", "stops_on_eos")}
    assert set(callbacks.rename_logs(keys, ["cls", "cls_val"])) == {
        "eval/cls_val/accuracy", "eval/cls_val/stops_on_eos", "eval/cls/accuracy", "eval/cls/stops_on_eos"}
