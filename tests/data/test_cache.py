"""data/cache.py: rows and token examples cached by content (files, data settings, tokenizer, template),
read back exactly, in safe formats (JSON + safetensors), never stale after an edit in place."""

import json
import os

import pytest

from llamaft.config import DataConfig, ModelConfig
from llamaft.data import chat
from llamaft.data.cache import cached_datasets, cached_splits, rows_key, tokens_key
from llamaft.data.pipeline import build_datasets, split_conversations
from llamaft.model.tokenizer import load_tokenizer
from train_helpers import qa_rows, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("cache-model"))


@pytest.fixture
def data_cfg(tmp_path):
    for name, n, seed in (("train", 12, 1), ("val", 4, 2)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows(n, seed)))
    return DataConfig(train=[str(tmp_path / "train.jsonl")], validation={"val": str(tmp_path / "val.jsonl")},
                      max_seq_length=64)


@pytest.fixture
def count_encode(monkeypatch):
    calls = []
    real = chat.encode
    monkeypatch.setattr(chat, "encode", lambda conv, *a, **kw: calls.append(conv.where) or real(conv, *a, **kw))
    return calls


def _tok(model_dir, data_cfg):
    return load_tokenizer(ModelConfig(name=str(model_dir)), data_cfg)


def test_second_read_comes_from_the_cache_and_is_identical(model_dir, data_cfg, tmp_path, count_encode):
    cache = tmp_path / "cache"
    tok, rules = _tok(model_dir, data_cfg)
    first = cached_datasets(data_cfg, tok, rules, cached_splits(data_cfg, cache), cache)
    assert len(count_encode) == 16
    splits = cached_splits(data_cfg, cache)
    again = cached_datasets(data_cfg, tok, rules, splits, cache)
    assert len(count_encode) == 16, "tokenized once"
    plain = build_datasets(data_cfg, tok, rules, splits=split_conversations(data_cfg))
    for got in (first, again):
        assert [(e.input_ids, e.labels, e.where) for e in got.train] == [(e.input_ids, e.labels, e.where) for e in plain.train]
        assert {n: [(e.input_ids, e.labels) for e in v] for n, v in got.validation.items()} == \
            {n: [(e.input_ids, e.labels) for e in v] for n, v in plain.validation.items()}
        assert json.loads(json.dumps(got.stats)) == json.loads(json.dumps(plain.stats))
    assert [c.messages for c in splits.validation["val"]] == [c.messages for c in split_conversations(data_cfg).validation["val"]]
    # safe formats only, each entry complete (no staging left)
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert files == ["examples.safetensors", "meta.json", "rows.json"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_key_follows_content_settings_tokenizer_and_template_not_paths_or_mtime(model_dir, data_cfg, tmp_path):
    tok, rules = _tok(model_dir, data_cfg)
    key, rkey = tokens_key(rows_key(data_cfg), tok, rules), rows_key(data_cfg)
    train = tmp_path / "train.jsonl"
    stat = train.stat()
    # the same bytes under another name: same key
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(train.read_bytes())
    assert rows_key(data_cfg.model_copy(update={"train": [str(copy)]})) == rkey
    # an edit in place that keeps size and mtime: a new key
    text = train.read_text()
    train.write_text(text.replace("w4", "w5", 1) if "w4" in text else text.replace("w5", "w4", 1))
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert train.stat().st_size == stat.st_size and rows_key(data_cfg) != rkey
    train.write_text(text)
    assert tokens_key(rows_key(data_cfg), tok, rules) == key
    # length policy, template, tokenizer: each a new key
    assert tokens_key(rows_key(data_cfg.model_copy(update={"max_seq_length": 32})), tok, rules) != key
    tok.chat_template = tok.chat_template + " "
    assert tokens_key(rows_key(data_cfg), tok, rules) != key
    tok2, rules2 = _tok(model_dir, data_cfg)
    tok2.add_tokens(["brandnew"])
    assert tokens_key(rows_key(data_cfg), tok2, rules2) != key


def test_an_edit_between_reading_and_tokenizing_never_keys_old_tokens_by_new_bytes(model_dir, data_cfg, tmp_path, count_encode):
    """The rows key is computed once, when the rows are read: the token entry is keyed by the rows it
    was built from, so the next run, reading the edited file, encodes it again."""
    cache, train = tmp_path / "cache", tmp_path / "train.jsonl"
    tok, rules = _tok(model_dir, data_cfg)
    splits = cached_splits(data_cfg, cache)
    train.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(12, 7)))  # edited while the tokenizer loads
    cached_datasets(data_cfg, tok, rules, splits, cache)
    count_encode.clear()
    got = cached_datasets(data_cfg, tok, rules, cached_splits(data_cfg, cache), cache)
    assert len(count_encode) == 16, "the edited rows are encoded, not served the old rows' tokens"
    want = build_datasets(data_cfg, tok, rules, splits=split_conversations(data_cfg))
    assert [e.input_ids for e in got.train] == [e.input_ids for e in want.train]


def test_preference_rows_bypass_the_cache_and_encode_as_without_it(model_dir, tmp_path):
    from preference_helpers import pair_rows

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows(8, 1)))
    cfg = DataConfig(train=[str(tmp_path / "pairs.jsonl")], val_ratio=0.25, max_seq_length=64)
    cache = tmp_path / "cache"
    tok, rules = _tok(model_dir, cfg)
    got = cached_datasets(cfg, tok, rules, cached_splits(cfg, cache), cache)
    want = build_datasets(cfg, tok, rules, splits=split_conversations(cfg))
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in got.train] == \
        [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in want.train] and got.train
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-supported written
