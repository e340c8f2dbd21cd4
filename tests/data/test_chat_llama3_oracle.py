"""Token-exact equality with Meta's reference dialog encoder (llama_models ChatFormat), 3 and 3.1.

Meta's encoder appends an assistant header for the model to complete; we compare without it. Like
Meta's encoder (llama-models 0.3) and unlike HF's hub templates, our templates keep message content
exactly as given (no trimming), so whitespace at the edges reaches the reference untouched;
the 3.1 reference gets the same "Cutting Knowledge Date / Today Date" text in its system message.
Expected labels come from Meta's per-message encoding: assistant content + its closing token.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest

from llamaft.data.chat import IGNORE_INDEX, encode, prompt_ids
from llamaft.model.tokenizer import make_rules, template_text

pytest.importorskip("llama_models")
from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall  # noqa: E402
from llama_models.llama3.chat_format import ChatFormat  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer  # noqa: E402

from llamaft.assets import llama3_tokenizer_file  # noqa: E402

DATE = "Cutting Knowledge Date: December 2023\nToday Date: {}\n\n"
LONG = " ".join(f"word{i} {i * 7919} äö 中文" for i in range(400))
U, A, S = "user", "assistant", "system"


def m(role, content, **kw):
    return {"role": role, "content": content, **kw}


DIALOGS = [
    [m(U, "Hello!"), m(A, "Hi there.")],
    [m(S, "You are terse."), m(U, "2+2?"), m(A, "4")],
    [m(U, "  padded question \n"), m(A, "\n\n answer with edges  \t")],
    [m(U, "Grüß Gott 🦙 — ¿qué tal? 日本語"), m(A, "Très bien, merci ✓ ")],
    [m(S, "  "), m(U, ""), m(A, "")],
    [m(U, "first"), m(A, "one"), m(U, "second\n\nwith lines"), m(A, "two\r\n- a\n- b"), m(U, "third"), m(A, "three")],
    [m(U, LONG), m(A, LONG[::-1])],
    [m(U, "numbers 1234567 0.001 1e-9 12,345"), m(A, "   1 2 3   ")],
    [m(U, "code?"), m(A, "```python\ndef f(x):\n    return x  # tabs\t\n```")],
    [m(U, "ends with user")],
]

TOOL_DIALOGS = [
    [m(S, "Use the code interpreter."), m(U, "What is 2**100?"),
     m(A, "", tool_calls=[{"function": {"name": "code_interpreter", "arguments": {"code": "print(2**100)"}}}]),
     m("tool", "1267650600228229401496703205376"), m(A, "It is 1267650600228229401496703205376.")],
    [m(U, "plot"), m(A, None, tool_calls=[{"function": {"name": "code_interpreter",
                                                         "arguments": {"code": "import math\nprint(math.pi)\n"}}}]),
     m("ipython", '{"stdout": "3.14159"}\n'), m(A, "Pi ≈ 3.14159")],
]


@pytest.fixture(scope="module")
def meta():
    return ChatFormat(Tokenizer(Path(llama3_tokenizer_file())))


@pytest.fixture(scope="module")
def rules31(llama3_tokenizer):
    return make_rules(llama3_tokenizer, "llama3.1", True, template_text("llama3.1"))


@pytest.fixture(scope="module")
def rules3(llama3_tokenizer):
    return make_rules(llama3_tokenizer, "llama3", True, template_text("llama3"))


def to_meta(messages, version, date="26 Jul 2024"):
    out = []
    if version == "3.1":
        system = messages[0]["content"] if messages and messages[0]["role"] == S else ""
        out.append(RawMessage(role=S, content=DATE.format(date) + system))
        messages = messages[1:] if messages and messages[0]["role"] == S else messages
    for msg in messages:
        if msg.get("tool_calls"):
            code = msg["tool_calls"][0]["function"]["arguments"]["code"]
            call = ToolCall(call_id="c", tool_name=BuiltinTool.code_interpreter, arguments={"code": code})
            out.append(RawMessage(role=A, content="", tool_calls=[call], stop_reason=StopReason.end_of_message))
        elif msg["role"] in ("tool", "ipython"):
            out.append(RawMessage(role="tool", content=msg["content"]))  # tool output is not trimmed
        else:
            out.append(RawMessage(role=msg["role"], content=msg["content"],
                                  stop_reason=StopReason.end_of_turn))
    return out


def meta_ids_labels(fmt, raw):
    """Reference ids (without the trailing generation header) and labels built message by message."""
    ids, labels = [128000], [IGNORE_INDEX]
    for msg in raw:
        toks, _ = fmt.encode_message(msg, fmt_json())
        head = len(fmt._encode_header(msg.role))
        ids += toks
        labels += [IGNORE_INDEX] * head + (toks[head:] if msg.role == A else [IGNORE_INDEX] * (len(toks) - head))
    full = fmt.encode_dialog_prompt(raw).tokens
    assert full[: len(ids)] == ids and len(full) - len(ids) == len(fmt._encode_header(A))
    return ids, labels


def fmt_json():
    from llama_models.datatypes import ToolPromptFormat

    return ToolPromptFormat.json


def conv(messages):
    return SimpleNamespace(messages=messages, where="test", text=None)


@pytest.mark.parametrize("k", range(len(DIALOGS)))
def test_llama31_matches_meta(k, meta, llama3_tokenizer, rules31):
    ids, labels = meta_ids_labels(meta, to_meta(DIALOGS[k], "3.1"))
    ex = encode(conv(DIALOGS[k]), llama3_tokenizer, rules31)
    assert ex.input_ids == ids
    assert ex.labels == labels


@pytest.mark.parametrize("k", range(len(TOOL_DIALOGS)))
def test_llama31_tool_calls_match_meta(k, meta, llama3_tokenizer, rules31):
    ids, labels = meta_ids_labels(meta, to_meta(TOOL_DIALOGS[k], "3.1"))
    ex = encode(conv(TOOL_DIALOGS[k]), llama3_tokenizer, rules31)
    assert ex.input_ids == ids
    assert ex.labels == labels
    assert 128010 in ex.input_ids and 128008 in ex.input_ids  # <|python_tag|> ... <|eom_id|>
    eom = ex.input_ids.index(128008)
    assert ex.labels[eom] == 128008  # the tool call's closing token is trained


@pytest.mark.parametrize("k", range(len(DIALOGS)))
def test_llama3_matches_meta(k, meta, llama3_tokenizer, rules3):
    ids, labels = meta_ids_labels(meta, to_meta(DIALOGS[k], "3"))
    ex = encode(conv(DIALOGS[k]), llama3_tokenizer, rules3)
    assert ex.input_ids == ids
    assert ex.labels == labels


def test_llama31_date_reaches_reference(meta, llama3_tokenizer):
    rules = make_rules(llama3_tokenizer, "llama3.1", True, template_text("llama3.1"),
                       template_kwargs={"date_string": "01 Jan 2025"})
    dialog = DIALOGS[1]
    ids, _ = meta_ids_labels(meta, to_meta(dialog, "3.1", date="01 Jan 2025"))
    assert encode(conv(dialog), llama3_tokenizer, rules).input_ids == ids


@pytest.mark.parametrize("version", ["3", "3.1"])
def test_prompt_ids_equal_meta_generation_prompt(version, meta, llama3_tokenizer, rules3, rules31):
    rules = rules31 if version == "3.1" else rules3
    dialog = DIALOGS[5][:-1]
    assert prompt_ids(dialog, llama3_tokenizer, rules) == meta.encode_dialog_prompt(to_meta(dialog, version)).tokens
