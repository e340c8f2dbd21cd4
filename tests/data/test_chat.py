"""conversation -> (input_ids, labels): exact ids and labels for Llama 3/3.1, ChatML and plain formats."""

from types import SimpleNamespace

import pytest

from llamaft.data.chat import IGNORE_INDEX, encode, prompt_ids, render_trained
from llamaft.errors import DataError, LlamaftError
from llamaft.model.tokenizer import make_rules, template_text

X = IGNORE_INDEX
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nS<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def conv(*pairs, text=None):
    return SimpleNamespace(messages=[{"role": r, "content": c} for r, c in pairs], where="f.jsonl:line 1", text=text)


def b(s):  # byte-level ids of the tiny tokenizer: id == byte value
    return list(s.encode())


def tiny_chatml(extra=("<repo_name>",)):
    """A SmolLM2-like byte-level tokenizer: ids 0-255 are bytes, then ChatML specials; eos == bos (broken)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: byte for byte, ch in bytes_to_unicode().items()}
    back = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    back.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    back.decoder = decoders.ByteLevel()
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra]
    back.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok = PreTrainedTokenizerFast(tokenizer_object=back, bos_token="<|im_start|>", eos_token="<|im_start|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def r3(llama3_tokenizer):
    return make_rules(llama3_tokenizer, "llama3", True, template_text("llama3"))


LLAMA3_HI = [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271, 9906, 0, 128009]


def test_llama3_exact_ids_and_labels(llama3_tokenizer, r3):
    ex = encode(conv(("user", "Hi"), ("assistant", "Hello!")), llama3_tokenizer, r3)
    assert ex.input_ids == LLAMA3_HI
    assert ex.labels == [X] * 11 + [9906, 0, 128009]
    assert ex.where == "f.jsonl:line 1"


def test_multi_turn_all_and_last(llama3_tokenizer, r3):
    c = conv(("user", "Hi"), ("assistant", "Hello!"), ("user", "Hi"), ("assistant", "ok"))
    ex = encode(c, llama3_tokenizer, r3)
    tail = [128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271, 564, 128009]
    assert ex.input_ids == LLAMA3_HI + tail
    first = [X] * 11 + [9906, 0, 128009]
    second = [X] * 10 + [564, 128009]
    assert ex.labels == first + second
    last = encode(c, llama3_tokenizer, r3, assistant_turns="last")
    assert last.labels == [X] * 14 + second
    every = encode(c, llama3_tokenizer, r3, train_on="all")
    assert every.labels == every.input_ids


def test_no_assistant_gives_no_labels(llama3_tokenizer, r3):
    ex = encode(conv(("user", "Hi")), llama3_tokenizer, r3)
    assert ex.input_ids == LLAMA3_HI[:7] and set(ex.labels) == {X}


def test_llama31_labels_are_assistant_plus_eot(llama3_tokenizer):
    r = make_rules(llama3_tokenizer, "llama3.1", True, template_text("llama3.1"))
    ex = encode(conv(("user", "Hi"), ("assistant", "Hello!")), llama3_tokenizer, r)
    trained = [t for t in ex.labels if t != X]
    assert trained == [9906, 0, 128009]
    assert ex.input_ids[:5] == [128000, 128006, 9125, 128007, 271]  # system header even without a system message
    assert ex.input_ids[-4:] == [271, 9906, 0, 128009]
    assert r.pad_id not in ex.input_ids and r.pad_id not in r.stop_ids


def test_eval_prompt_renders_tools_as_training_did(llama3_tokenizer):
    """A row with tool definitions: the eval/generation prompt is exactly the training render up to
    the assistant's answer (tools included), not the render of the bare messages."""
    from llamaft.eval.generation import build_prompts

    r = make_rules(llama3_tokenizer, "llama3.1", True, template_text("llama3.1"))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    row = SimpleNamespace(messages=[{"role": "user", "content": "Weather in Paris?"},
                                    {"role": "assistant", "content": "Sunny."}], where="t:1", text=None, tools=tools)
    ex = encode(row, llama3_tokenizer, r)
    first_trained = next(i for i, t in enumerate(ex.labels) if t != X)
    assert "get_weather" in llama3_tokenizer.decode(ex.input_ids[:first_trained])
    for conv_like in (row, {"messages": row.messages, "where": "t:1", "tools": tools}):
        (p,) = build_prompts([conv_like], llama3_tokenizer, r, max_prompt_tokens=4096)
        assert p["ids"] == ex.input_ids[:first_trained] and p["reference"] == "Sunny."
    bare = prompt_ids(row.messages[:1], llama3_tokenizer, r)
    assert bare != ex.input_ids[:first_trained]  # what eval used to send: the tools were missing


def test_base_plain_format(llama3_tokenizer):
    r = make_rules(llama3_tokenizer, "llama3.1", False, None)
    ex = encode(conv(("user", "Hi"), ("assistant", "Hello!")), llama3_tokenizer, r)
    assert ex.input_ids == [128000, 13347, 271, 9906, 0, 128001]
    assert ex.labels == [X, X, X, 9906, 0, 128001]
    assert prompt_ids([{"role": "user", "content": "Hi"}], llama3_tokenizer, r) == [128000, 13347, 271]


def test_plain_text_all_trained(llama3_tokenizer, r3):
    ex = encode(conv(text="Hi"), llama3_tokenizer, r3)
    assert ex.input_ids == ex.labels == [128000, 13347, 128001]


def test_special_token_text_in_content_is_an_error(llama3_tokenizer, r3):
    with pytest.raises(DataError, match=r"f.jsonl:line 1: message 2 .*<\|eot_id\|>"):
        encode(conv(("user", "Hi"), ("assistant", "a<|eot_id|>b")), llama3_tokenizer, r3)


def test_not_prefix_stable_template_is_an_error(llama3_tokenizer):
    bad = "{{ messages|length }}{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}"
    r = make_rules(llama3_tokenizer, "llama3", True, bad)
    with pytest.raises(DataError, match="prefix-stable"):
        encode(conv(("user", "Hi"), ("assistant", "Hello!")), llama3_tokenizer, r)


def test_custom_swedish_template(llama3_tokenizer):
    sv = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}### Fråga:\n{{ m.content }}\n\n"
          "{% else %}### Svar:\n{{ m.content }}<|eot_id|>\n\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}### Svar:\n{% endif %}")
    r = make_rules(llama3_tokenizer, "llama3", True, sv)
    ex = encode(conv(("user", "Hej"), ("assistant", "Hej då")), llama3_tokenizer, r)
    text = llama3_tokenizer.decode(ex.input_ids)
    assert text == "<|begin_of_text|>### Fråga:\nHej\n\n### Svar:\nHej då<|eot_id|>\n\n"
    trained = [t for t in ex.labels if t != X]
    assert llama3_tokenizer.decode(trained) == "Hej då<|eot_id|>"  # the "\n\n" after it is not trained
    assert ex.labels[-1] == X


def test_chatml_other_family_rules_and_labels():
    tok = tiny_chatml()
    r = make_rules(tok, "other", True, CHATML)
    assert (r.eos_id, r.turn_end_ids, r.stop_ids, r.pad_id) == (256, [258], [258], 259)
    assert tok.pad_token == "<repo_name>" and tok.padding_side == "right"
    ex = encode(conv(("user", "hi"), ("assistant", "yo")), tok, r)
    expect = ([257] + b("system\nS") + [258, 10, 257] + b("user\nhi") + [258, 10, 257] + b("assistant\n")
              + [121, 111, 258, 10])
    assert ex.input_ids == expect
    assert ex.labels == [X] * (len(expect) - 4) + [121, 111, 258, X]  # "\n" after <|im_end|> untrained


def test_other_without_spare_token_needs_add_pad_token():
    tok = tiny_chatml(extra=())
    with pytest.raises(LlamaftError, match="add_pad_token: true"):
        make_rules(tok, "other", True, CHATML)
    r = make_rules(tok, "other", True, CHATML, add_pad_token=True)
    assert r.added_tokens == ["<|pad|>"] and r.pad_id == 259 and tok.pad_token == "<|pad|>"


def test_render_trained_marks_spans(llama3_tokenizer, r3):
    ex = encode(conv(("user", "Hi"), ("assistant", "Hello!")), llama3_tokenizer, r3)
    t = render_trained(ex, llama3_tokenizer)
    assert t.plain == llama3_tokenizer.decode(ex.input_ids)
    green = [t.plain[s.start:s.end] for s in t.spans if "green" in str(s.style)]
    assert green == ["Hello!<|eot_id|>"]
