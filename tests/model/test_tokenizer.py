"""Offline Llama 3 tokenizer (id-exact vs Meta's tiktoken), family rules, loading and saving."""

import json
from pathlib import Path

import pytest

from llamaft.config import DataConfig, ModelConfig
from llamaft.errors import ConfigError, LlamaftError
from llamaft.model.tokenizer import llama3_tokenizer as build_llama3
from llamaft.model.tokenizer import (
    detect_family, load_tokenizer, make_rules, save_tokenizer, special_token_names, template_text,
)

TEXTS = [
    "Hello world!", "  leading and trailing  \n\n", "数字 12345678 ünïcödé 🦙🦙 emoji", "a\r\nb\n\n\n  c\t\td",
    "I'm won't they'LL 'S WE'VE", "x" * 300, "   ", "\n", "", "1234567890123 3.14159 -0.5e10",
    "Ｆｕｌｌ width ＡＢＣ", "   foo\n   bar  \n", "Ελληνικά русский עברית العربية हिन्दी",
    "<|eot_id|> is text here", "def f():\n\treturn {'a': [1, 2]}\n", "\u200b zero\u00a0width nbsp",
]


@pytest.fixture(scope="module")
def meta_tok():
    from llama_models.llama3.tokenizer import Tokenizer

    from llamaft.assets import llama3_tokenizer_file

    return Tokenizer(Path(llama3_tokenizer_file()))


def test_ids_equal_meta_tiktoken(llama3_tokenizer, meta_tok):
    for text in TEXTS:
        if "<|" in text:  # HF parses special-token text; Meta's encode(…) treats it as plain text
            continue
        assert llama3_tokenizer(text, add_special_tokens=False)["input_ids"] == meta_tok.encode(text, bos=False, eos=False), text
        assert llama3_tokenizer(text)["input_ids"] == meta_tok.encode(text, bos=True, eos=False)


def test_special_tokens_31(llama3_tokenizer):
    tok = llama3_tokenizer
    assert len(tok) == 128256
    expect = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128002: "<|reserved_special_token_0|>",
              128003: "<|reserved_special_token_1|>", 128004: "<|finetune_right_pad_id|>",
              128005: "<|reserved_special_token_2|>", 128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
              128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>",
              128011: "<|reserved_special_token_3|>", 128255: "<|reserved_special_token_247|>"}
    for i, name in expect.items():
        assert tok.convert_ids_to_tokens(i) == name
    assert tok.bos_token == "<|begin_of_text|>" and tok.pad_token_id == 128004 and tok.padding_side == "right"
    assert tok.decode([128006, 882, 128007]) == "<|start_header_id|>user<|end_header_id|>"


def test_special_token_names_llama3():
    names = special_token_names("3")
    assert names[4] == "<|reserved_special_token_2|>" and names[8] == "<|reserved_special_token_4|>"
    assert names[9] == "<|eot_id|>" and names[10] == "<|reserved_special_token_5|>"
    assert names[255] == "<|reserved_special_token_250|>"


def test_cached_build_is_reused(llama3_tokenizer):
    from llamaft.assets import cache_dir

    assert list((cache_dir() / "tokenizers").glob("llama3.1-*/tokenizer.json"))
    again = build_llama3("3.1")  # from the in-process cache: a copy, so changes stay apart
    again.pad_token = "<|reserved_special_token_5|>"
    assert llama3_tokenizer.pad_token_id == 128004 and again("ok")["input_ids"] == [128000, 564]


def test_detect_family(llama3_tokenizer):
    from types import SimpleNamespace

    assert detect_family(llama3_tokenizer) == "llama3.1"
    assert detect_family(SimpleNamespace(convert_tokens_to_ids=lambda t: None, unk_token_id=None, unk_token=None)) == "other"


def test_rules_31_instruct_and_base(llama3_tokenizer):
    r = make_rules(llama3_tokenizer, "llama3.1", True, template_text("llama3.1"))
    assert (r.pad_id, r.eos_id, r.stop_ids, r.turn_end_ids) == (128004, 128001, [128001, 128008, 128009], [128009, 128008])
    b = make_rules(llama3_tokenizer, "llama3.1", False, None)
    assert (b.pad_id, b.eos_id, b.stop_ids, b.turn_end_ids, b.chat_template) == (128004, 128001, [128001], [128001], None)


def test_rules_3_instruct_and_base(llama3_tokenizer):
    r = make_rules(llama3_tokenizer, "llama3", True, template_text("llama3"))
    assert (r.pad_id, r.eos_id, r.stop_ids, r.turn_end_ids) == (128004, 128001, [128001, 128009], [128009])
    b = make_rules(llama3_tokenizer, "llama3", False, None)
    assert b.stop_ids == [128001] and b.pad_id not in b.stop_ids


def test_load_offline_31_and_3(tmp_path):
    data = DataConfig(train=["x.jsonl"], date="01 Feb 2025")
    tok, r = load_tokenizer(ModelConfig(name="tiny", tokenizer="llama3.1"), data)
    assert (r.family, r.instruct, r.pad_id, r.template_kwargs) == ("llama3.1", True, 128004, {"date_string": "01 Feb 2025"})
    assert tok.pad_token_id == 128004 and tok.eos_token_id == 128009
    assert "Today Date: 01 Feb 2025" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, **r.template_kwargs)
    tok3, r3 = load_tokenizer(ModelConfig(name="tiny", tokenizer="llama3"), data)
    assert (r3.family, r3.stop_ids, r3.template_kwargs) == ("llama3", [128001, 128009], {})
    assert tok3.convert_ids_to_tokens(128004) == "<|reserved_special_token_2|>" and tok3.pad_token_id == 128004
    assert r3.chat_template == template_text("llama3")


def test_load_base_by_config():
    tok, r = load_tokenizer(ModelConfig(name="meta-llama/Llama-3.1-8B", tokenizer="llama3.1", instruct=False), None)
    assert (r.instruct, r.stop_ids, r.eos_id, r.chat_template) == (False, [128001], 128001, None)
    assert tok.eos_token_id == 128001


def test_custom_template_file(tmp_path):
    t = tmp_path / "sv.jinja"
    t.write_text("{{ bos_token }}{% for m in messages %}### {{ m.role }}:\n{{ m.content }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}### assistant:\n{% endif %}\n")
    tok, r = load_tokenizer(ModelConfig(name="x", tokenizer="llama3.1"), DataConfig(train=["x"], chat_template=str(t)))
    assert r.chat_template.startswith("{{ bos_token }}") and tok.chat_template == r.chat_template
    with pytest.raises(ConfigError, match="data.chat_template"):
        load_tokenizer(ModelConfig(name="x", tokenizer="llama3.1"), DataConfig(train=["x"], chat_template=str(tmp_path / "no.jinja")))


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(LlamaftError, match="model.name"):
        load_tokenizer(ModelConfig(name=str(tmp_path / "nothing")), None)


def test_save_tokenizer_writes_stop_ids(tmp_path):
    tok, r = load_tokenizer(ModelConfig(name="x", tokenizer="llama3.1"), None)
    save_tokenizer(tok, r, tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [128001, 128008, 128009] and gen["pad_token_id"] == 128004
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(str(tmp_path))
    assert back.pad_token_id == 128004 and back.chat_template == r.chat_template
    assert back("héllo 123")["input_ids"] == tok("héllo 123")["input_ids"]


def test_saved_template_keeps_the_date(tmp_path):
    tok, r = load_tokenizer(ModelConfig(name="x", tokenizer="llama3.1"), DataConfig(train=["x"], date="02 Mar 2025"))
    save_tokenizer(tok, r, tmp_path)
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "x"}]
    assert back.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False, **r.template_kwargs)
    assert "Today Date: 02 Mar 2025" in back.apply_chat_template(msgs, tokenize=False)


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_rules(tmp_path):
    from types import SimpleNamespace

    from llamaft.assets import smollm2_gguf
    from llamaft.data.chat import IGNORE_INDEX, encode

    tok, r = load_tokenizer(ModelConfig(name=str(smollm2_gguf())), None)
    assert (r.family, r.instruct) == ("other", True)
    assert tok.convert_ids_to_tokens(r.turn_end_ids) == ["<|im_end|>"] and 2 in r.stop_ids
    assert r.pad_id not in r.stop_ids and r.pad_id not in (r.eos_id, tok.bos_token_id, 1, 2)
    assert tok.pad_token_id == r.pad_id and tok.eos_token == "<|im_end|>"
    assert r.eos_id == tok.convert_tokens_to_ids("<|endoftext|>")  # plain-text document end
    c = SimpleNamespace(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                        where="w", text=None)
    ex = encode(c, tok, r)
    trained = [t for t in ex.labels if t != IGNORE_INDEX]
    assert trained[-1] == 2 and tok.decode(trained) == "yo<|im_end|>"
    assert ex.labels[-1] == IGNORE_INDEX and ex.input_ids[-1] == tok.convert_tokens_to_ids("\u010a")  # trailing "\n"
    save_tokenizer(tok, r, tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == r.stop_ids and gen["pad_token_id"] == r.pad_id
