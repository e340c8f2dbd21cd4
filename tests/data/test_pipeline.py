"""build_datasets + inspect_data: splits, named validation sets, length policy, accounting, dump.

Most tests use a fake `chat.encode` (1 token per character, assistant characters trained) so the
expected ids/labels are obvious; `test_real_encode_*` runs the real one when it exists.
"""

import io
import json
import sys
import types
from dataclasses import dataclass

import pytest

from llamaft.config import DataConfig
from llamaft.data.pipeline import build_datasets, length_stats, split_rows
from llamaft.errors import DataError


@dataclass
class FakeExample:
    input_ids: list
    labels: list
    where: str


def fake_encode(conv, tokenizer, rules, *, train_on="completion", assistant_turns="all"):
    """1 id per character; a 1-id header per message; assistant content trained (or all with train_on=all)."""
    if conv.text is not None:
        ids = [ord(c) for c in conv.text]
        return FakeExample(ids, list(ids), conv.where)
    ids, labels = [], []
    for m in conv.messages:
        body = [ord(c) for c in m["content"]]
        trained = train_on == "all" or m["role"] == "assistant"
        ids += [1] + body
        labels += [1 if train_on == "all" else -100] + (body if trained else [-100] * len(body))
    return FakeExample(ids, labels, conv.where)


@pytest.fixture
def fake_chat(monkeypatch):
    """Patch llamaft.data.chat.encode (or stand in for the module while it is not written yet)."""
    try:
        from llamaft.data import chat
    except ImportError:
        chat = types.ModuleType("llamaft.data.chat")
        monkeypatch.setitem(sys.modules, "llamaft.data.chat", chat)
    monkeypatch.setattr(chat, "encode", fake_encode, raising=False)
    monkeypatch.setattr(chat, "render_trained", lambda ex, tok: f"<{len(ex.input_ids)} ids>", raising=False)
    return chat


def qa_file(path, n, answer=lambda i: f"a{i}", question=lambda i: f"q{i}"):
    path.write_text("".join(json.dumps({"question": question(i), "answer": answer(i)}) + "\n" for i in range(n)))
    return str(path)


def build(tmp_path, **data):
    return build_datasets(DataConfig(**data), tokenizer=None, rules=None)


def qs(examples):
    """The question number of each example (fake ids: [1, 'q', digits..., 1, 'a', ...])."""
    out = []
    for ex in examples:
        text = "".join(chr(i) for i in ex.input_ids if i > 1)
        out.append(int(text[1:text.index("a")]))
    return out


# -- splits ------------------------------------------------------------------------------------


def test_split_ratios_are_deterministic_and_keep_file_order():
    rows = list(range(20))
    train, val, test = split_rows(rows, 0.2, 0.1, seed=42)
    assert (len(train), len(val), len(test)) == (14, 4, 2)
    assert sorted(train + val + test) == rows
    assert train == sorted(train) and val == sorted(val) and test == sorted(test)
    assert split_rows(rows, 0.2, 0.1, seed=42) == (train, val, test)
    assert split_rows(rows, 0.2, 0.1, seed=7) != (train, val, test)
    # The held-out set does not depend on anything but rows, ratio and seed (not on the tokenizer).
    assert split_rows(rows, 0.0, 0.0, seed=42) == (rows, [], [])
    assert split_rows(list(range(3)), 0.1, 0.0, 1)[1].__len__() == 1  # a positive ratio holds out >= 1 row


def test_split_too_few_rows():
    with pytest.raises(DataError, match=r"^data.train: only 2 rows: too few to hold out val_ratio=0.5 and test_ratio=0.3"):
        split_rows([1, 2], 0.5, 0.3, 0)


def test_build_splits_by_ratio(tmp_path, fake_chat):
    ds = build(tmp_path, train=[qa_file(tmp_path / "t.jsonl", 20)], val_ratio=0.2, test_ratio=0.1, split_seed=3)
    train, val, test = split_rows(list(range(20)), 0.2, 0.1, seed=3)
    assert (qs(ds.train), qs(ds.validation["validation"]), qs(ds.test)) == (train, val, test)
    assert list(ds.validation) == ["validation"]
    assert ds.stats["formats"] == {str(tmp_path / "t.jsonl"): "qa"}
    assert ds.train[0].where == f"{tmp_path / 't.jsonl'}:line {train[0] + 1}"


def test_held_out_conversations_match_build(tmp_path, fake_chat):
    from llamaft.data.pipeline import split_conversations

    cfg = DataConfig(train=[qa_file(tmp_path / "t.jsonl", 20)], val_ratio=0.2, test_ratio=0.1, split_seed=3)
    ds = build_datasets(cfg, None, None)
    splits = split_conversations(cfg)
    val, test = splits.validation, splits.test
    assert {k: [c.where for c in v] for k, v in val.items()} == {k: [e.where for e in v] for k, v in ds.validation.items()}
    assert [c.where for c in test] == [e.where for e in ds.test]


def test_validation_file_means_no_val_split_and_test_file_no_test_split(tmp_path, fake_chat):
    t = qa_file(tmp_path / "t.jsonl", 10)
    v = qa_file(tmp_path / "v.jsonl", 3)
    ds = build(tmp_path, train=[t], validation=v, test=v, val_ratio=0.3, test_ratio=0.2)
    assert qs(ds.train) == list(range(10))
    assert {k: qs(x) for k, x in ds.validation.items()} == {"validation": [0, 1, 2]}
    assert qs(ds.test) == [0, 1, 2]


def test_named_validation_dir_and_mapping(tmp_path, fake_chat):
    vdir = tmp_path / "val"
    vdir.mkdir()
    qa_file(vdir / "relevance_val.jsonl", 2)
    (vdir / "accuracy_val.json").write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    t = qa_file(tmp_path / "t.jsonl", 4)
    ds = build(tmp_path, train=[t], validation=str(vdir))
    assert list(ds.validation) == ["accuracy_val", "relevance_val"]
    assert qs(ds.train) == [0, 1, 2, 3]
    assert ds.stats["formats"][str(vdir / "accuracy_val.json")] == "alpaca"  # format detected per file
    ds = build(tmp_path, train=[t], validation={"z": str(vdir / "relevance_val.jsonl"), "a": t})
    assert list(ds.validation) == ["z", "a"] and list(ds.stats["validation"]) == ["z", "a"]


def test_several_train_files_in_order_with_their_own_formats(tmp_path, fake_chat):
    a = qa_file(tmp_path / "a.jsonl", 2)
    b = tmp_path / "b.csv"
    b.write_text("text\nhello\n")
    ds = build(tmp_path, train=[a, str(b)], val_ratio=0.0)
    assert [e.where for e in ds.train] == [f"{a}:line 1", f"{a}:line 2", f"{b}:row 1"]
    assert ds.train[2].input_ids == [ord(c) for c in "hello"]


def test_bad_row_fails_with_where(tmp_path, fake_chat):
    t = tmp_path / "t.jsonl"
    t.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": 5}\n')
    with pytest.raises(DataError, match=rf"^{t}:line 2: field 'answer': expected a string, got int$"):
        build(tmp_path, train=[str(t)])


# -- length policy and accounting --------------------------------------------------------------


def test_drop_counts_and_stats(tmp_path, fake_chat):
    # lengths: 1 + 2 (q + digit) + 1 + len(answer)
    t = qa_file(tmp_path / "t.jsonl", 5, answer=lambda i: "x" * (5 + 4 * i))
    ds = build(tmp_path, train=[t], val_ratio=0.0, max_seq_length=17)
    assert [len(e.input_ids) for e in ds.train] == [9, 13, 17]
    s = ds.stats["train"]
    assert s["rows"] == 5 and s["examples"] == 3 and s["truncated"] == 0
    assert s["dropped"] == {"too_long": 2, "no_trained_tokens": 0}
    assert s["dropped_where"]["too_long"] == [f"{t}:line 4", f"{t}:line 5"]
    assert s["tokens"] == {"min": 9, "mean": 13.0, "p95": 17, "max": 17, "total": 39}
    assert s["trained_tokens"] == 5 + 9 + 13
    assert s["longest_row"] == 25


def test_truncate_cuts_and_drops_rows_left_without_trained_tokens(tmp_path, fake_chat):
    t = qa_file(tmp_path / "t.jsonl", 3, question=lambda i: "q" + "p" * (4 + 8 * i), answer=lambda i: "yes")
    # lengths: 1 + (5 + 8i) + 1 + 3 = 10, 18, 26; max 12 keeps 10 whole, cuts 18 into its answer?
    # row 1: header(1) q+8p... 13 prompt ids then answer at 14.. -> cut at 12 leaves no answer: dropped.
    ds = build(tmp_path, train=[t], val_ratio=0.0, max_seq_length=12, truncation="truncate")
    assert [len(e.input_ids) for e in ds.train] == [10]
    s = ds.stats["train"]
    assert s["truncated"] == 2 and s["dropped"] == {"too_long": 0, "no_trained_tokens": 2}
    t2 = qa_file(tmp_path / "t2.jsonl", 1, question=lambda i: "q", answer=lambda i: "z" * 30)
    (ex,) = build(tmp_path, train=[t2], val_ratio=0.0, max_seq_length=12, truncation="truncate").train
    assert ex.input_ids == [1, ord("q"), 1] + [ord("z")] * 9
    assert ex.labels == [-100, -100, -100] + [ord("z")] * 9


def test_all_rows_too_long_is_an_error(tmp_path, fake_chat):
    t = qa_file(tmp_path / "t.jsonl", 120, answer=lambda i: "x" * 70)
    with pytest.raises(DataError) as e:
        build(tmp_path, train=[t], val_ratio=0.0, max_seq_length=64)
    assert str(e.value) == (f"{t}: all 120 rows of data.train are longer than max_seq_length=64 (longest: 76 tokens); "
                            "raise data.max_seq_length or use data.truncation=truncate")


def test_all_rows_without_trained_tokens_is_an_error(tmp_path, fake_chat, monkeypatch):
    t = qa_file(tmp_path / "t.jsonl", 4)
    monkeypatch.setattr(fake_chat, "encode", lambda c, *a, **k: FakeExample([1, 2], [-100, -100], c.where))
    with pytest.raises(DataError, match=r"all 4 rows of data.train have no trained tokens \(every label is -100\); check the assistant"):
        build(tmp_path, train=[t], val_ratio=0.0)


def test_empty_validation_set_is_an_error(tmp_path, fake_chat):
    t = qa_file(tmp_path / "t.jsonl", 3)
    v = qa_file(tmp_path / "v.jsonl", 2, answer=lambda i: "x" * 40)
    with pytest.raises(DataError, match=rf"^{v}: all 2 rows of validation set 'validation' are longer"):
        build(tmp_path, train=[t], validation=v, max_seq_length=20)


def test_train_on_and_assistant_turns_are_passed_to_encode(tmp_path, fake_chat, monkeypatch):
    seen = []
    monkeypatch.setattr(fake_chat, "encode", lambda c, tok, rules, **kw: seen.append(kw) or fake_encode(c, tok, rules, **kw))
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps({"messages": [{"role": "user", "content": "only a prompt"}]}) + "\n")
    ds = build(tmp_path, train=[str(t)], val_ratio=0.0, train_on="all", assistant_turns="last")
    assert seen == [{"train_on": "all", "assistant_turns": "last"}]
    assert ds.train[0].labels == ds.train[0].input_ids


def test_length_stats_p95_nearest_rank():
    assert length_stats(list(range(1, 101))) == {"min": 1, "mean": 50.5, "p95": 95, "max": 100, "total": 5050}
    assert length_stats([]) == {"min": 0, "mean": 0.0, "p95": 0, "max": 0, "total": 0}


# -- inspect_data ------------------------------------------------------------------------------


def _run_inspect(tmp_path, monkeypatch, fake_chat, **kw):
    from rich.console import Console

    from llamaft.config import config_from_dict
    from llamaft.data.inspect import inspect_data

    t = qa_file(tmp_path / "t.jsonl", 10, answer=lambda i: "x" * (3 * i + 1))
    cfg = config_from_dict({"model": {"name": "m"}, "data": {"train": [t], "val_ratio": 0.2, "max_seq_length": 20}})
    out = io.StringIO()
    stats = inspect_data(cfg, lambda model_cfg, data_cfg: ("TOK", "RULES"), console=Console(file=out, width=200), **kw)
    return cfg, stats, out.getvalue()


def test_inspect_dump_is_the_trainers_order_and_content(tmp_path, monkeypatch, fake_chat):
    dump = tmp_path / "out" / "train.jsonl"
    cfg, stats, text = _run_inspect(tmp_path, monkeypatch, fake_chat, show=2, dump=str(dump))
    ds = build_datasets(cfg.data, "TOK", "RULES")
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert lines == [{"input_ids": e.input_ids, "labels": e.labels} for e in ds.train]
    assert stats["dump"] == str(dump) and stats["train"]["examples"] == len(lines)
    assert [p.name for p in dump.parent.iterdir()] == ["train.jsonl"]  # no temp file left behind
    assert "bold green = trained" in text and "validation" in text and "dropped" in text
    assert text.count("<") == 2  # exactly `show` rendered examples
    n_long = stats["train"]["dropped"]["too_long"]
    assert n_long > 0 and f"train: dropped {n_long} (longer than max_seq_length):" in text


def test_inspect_reads_data_before_loading_the_tokenizer(tmp_path, monkeypatch, fake_chat):
    from llamaft.config import config_from_dict
    from llamaft.data.inspect import inspect_data

    t = tmp_path / "t.jsonl"
    t.write_text('{"question": "q"}\n')
    cfg = config_from_dict({"model": {"name": "m"}, "data": {"train": [str(t)], "format": "qa"}})
    with pytest.raises(DataError, match=r"t\.jsonl:line 1: field 'answer': missing"):
        inspect_data(cfg, lambda *a: pytest.fail("tokenizer loaded before the data was checked"))


def test_inspect_show_zero_and_no_dump(tmp_path, monkeypatch, fake_chat):
    _, stats, text = _run_inspect(tmp_path, monkeypatch, fake_chat, show=0)
    assert "dump" not in stats and "<" not in text


# -- the real chat.encode ----------------------------------------------------------------------

BYTE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def byte_tokenizer():
    """One id per byte (no merges) + Llama-3-style specials at 256.. — exact ids are easy to write down."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llamaft.model.tokenizer import TokenRules

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]})
    tok.pad_token = "<|pad|>"
    ids = tok.convert_tokens_to_ids
    rules = TokenRules(family="llama3", instruct=True, pad_id=ids("<|pad|>"), eos_id=ids("<|end_of_text|>"),
                       stop_ids=[ids("<|end_of_text|>"), ids("<|eot_id|>")], turn_end_ids=[ids("<|eot_id|>")],
                       chat_template=BYTE_TEMPLATE, template_kwargs={})
    return tok, rules


def test_real_encode_through_build_and_dump(tmp_path):
    from llamaft.data.inspect import write_dump

    tok, rules = byte_tokenizer()
    t = tmp_path / "t.jsonl"
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "long " * 20, "answer": "5"}, {"question": "3+3?", "answer": "6"}]
    t.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[str(t)], val_ratio=0.0, system_prompt="Be brief.", max_seq_length=64)
    ds = build_datasets(cfg, tok, rules)
    assert [e.where for e in ds.train] == [f"{t}:line 1", f"{t}:line 3"]
    assert ds.stats["train"]["dropped"] == {"too_long": 1, "no_trained_tokens": 0}
    ex = ds.train[0]
    assert tok.decode(ex.input_ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    four = tok("4", add_special_tokens=False)["input_ids"]
    assert [x for x in ex.labels if x != -100] == four + [eot]  # the answer and its end-of-turn, nothing else
    assert ex.labels[-2:] == four + [eot] and ex.labels[:-2] == [-100] * (len(ex.labels) - 2)
    dump = write_dump(ds.train, str(tmp_path / "d.jsonl"))
    assert [json.loads(line) for line in open(dump)] == [{"input_ids": e.input_ids, "labels": e.labels} for e in ds.train]


@pytest.mark.slow
def test_real_llama31_tokenizer_exact_ids(tmp_path, llama3_tokenizer):
    """Exact Llama 3.1 Instruct ids from build_datasets (Meta's tokenizer, our template, fixed date)."""
    from llamaft.config import ModelConfig
    from llamaft.model.tokenizer import load_tokenizer

    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n")
    cfg = DataConfig(train=[str(t)], val_ratio=0.0, date="26 Jul 2024", max_seq_length=40, truncation="truncate")
    tok, rules = load_tokenizer(ModelConfig(name="meta-llama/Llama-3.1-8B-Instruct", tokenizer="llama3.1",
                                            family="llama3.1", instruct=True), cfg)
    full = [128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724, 2696, 25,
            220, 1627, 10263, 220, 2366, 19, 271, 128009, 128006, 882, 128007, 271, 17, 10, 17, 30, 128009, 128006, 78191,
            128007, 271, 19, 128009]
    (ex,) = build_datasets(cfg.model_copy(update={"max_seq_length": 64}), tok, rules).train
    assert ex.input_ids == full and ex.labels == [-100] * 39 + [19, 128009]
    ds = build_datasets(cfg, tok, rules)  # truncate at 40: the answer stays, its <|eot_id|> is cut
    assert ds.train[0].input_ids == full[:40] and ds.stats["train"]["truncated"] == 1
    with pytest.raises(DataError, match=r"all 1 rows of data.train have no trained tokens .*the cut removed every answer"):
        build_datasets(cfg.model_copy(update={"max_seq_length": 39}), tok, rules)
