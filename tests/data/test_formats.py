"""Rows -> conversations: detection, every format from every file type, and every row error."""

import json

import pytest

from llamaft.config import ColumnsConfig
from llamaft.data.formats import Conversation, detect_format, to_conversation
from llamaft.data.sources import Record, read_records
from llamaft.errors import DataError

COLS = ColumnsConfig()
W = "d.jsonl:line 7"


def conv(data, fmt=None, columns=COLS, system_prompt=None, **kw):
    rec = Record(data, W)
    return to_conversation(rec, fmt or detect_format([rec], columns), columns, system_prompt, **kw)


def err(data, fmt=None, columns=COLS, **kw):
    with pytest.raises(DataError) as e:
        conv(data, fmt, columns, **kw)
    return str(e.value)


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


# -- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, fmt",
    [
        (["messages", "text"], "messages"),
        (["conversations"], "messages"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output", "question", "answer"], "alpaca"),
        (["question", "answer"], "qa"),
        (["query", "response"], "qa"),
        (["prompt", "completion"], "qa"),
        (["text", "id"], "text"),
    ],
)
def test_detect_format(keys, fmt):
    assert detect_format([Record(dict.fromkeys(keys, "x"), W)], COLS) == fmt


def test_detect_with_configured_columns():
    cols = ColumnsConfig(question="q", answer="a")
    assert detect_format([Record({"q": "x", "a": "y"}, W)], cols) == "qa"
    # Aliases apply only to default names: a user who named columns gets exactly those.
    with pytest.raises(DataError):
        detect_format([Record({"query": "x", "response": "y"}, W)], cols)


def test_detect_failure_lists_columns_and_config_keys():
    with pytest.raises(DataError) as e:
        detect_format([Record({"prompt_text": "x", "reply": "y"}, W)], COLS)
    assert str(e.value) == (
        "d.jsonl:line 7: cannot tell the data format from the columns ['prompt_text', 'reply']; expected 'messages' (messages), "
        "'instruction'+'output' (alpaca), 'question'+'answer' (qa) or 'text' (text). "
        "Name your columns with data.columns.* (e.g. data.columns.question=prompt) or set data.format"
    )


# -- conversion --------------------------------------------------------------------------------


def test_qa_and_aliases():
    assert conv({"question": "2+2?", "answer": "4"}) == Conversation(
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], W)
    assert conv({"query": "q", "response": "r"}).messages[1] == {"role": "assistant", "content": "r"}


def test_alpaca_with_and_without_input():
    assert conv({"instruction": "Translate", "input": "chat", "output": "cat"}).messages == [
        {"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]
    for row in ({"instruction": "Say hi", "output": "hi"}, {"instruction": "Say hi", "input": "", "output": "hi"},
                {"instruction": "Say hi", "input": None, "output": "hi"}):
        assert conv(row).messages[0] == {"role": "user", "content": "Say hi"}


def test_text():
    assert conv({"text": "Once upon a time"}) == Conversation([], W, text="Once upon a time")


def test_messages_roles_aliases_and_passthrough():
    call = [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    msgs = [U, {"role": "assistant", "content": None, "tool_calls": call},
            {"role": "ipython", "content": "42", "tool_call_id": "c1"}, A]
    assert conv({"messages": msgs}).messages == [
        U, {"role": "assistant", "content": "", "tool_calls": call},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}, A]


def test_parquet_style_none_extras_are_dropped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    call = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    msgs = [U, {"role": "assistant", "content": "", "tool_calls": call}, {"role": "tool", "content": "1"}, A]
    pq.write_table(pa.Table.from_pylist([{"messages": msgs}]), str(tmp_path / "d.parquet"))
    (rec,) = read_records(str(tmp_path / "d.parquet"))
    assert rec.data["messages"][0]["tool_calls"] is None  # pyarrow fills the struct's missing keys
    assert to_conversation(rec, "messages", COLS).messages == msgs


def test_tools_column():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert conv({"messages": [U, A], "tools": tools}).tools == tools
    assert conv({"messages": [U, A], "tools": json.dumps(tools)}).tools == tools  # CSV: JSON text
    assert conv({"messages": [U, A], "tools": None}).tools is None
    assert conv({"messages": [U, A]}).tools is None
    assert err({"messages": [U, A], "tools": 5}) == f"{W}: field 'tools': expected a list of tool definitions (objects), got int"


def test_sharegpt():
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert conv(row).messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "yo"}]


def test_configured_role_content_keys():
    cols = ColumnsConfig(messages="chat", role="speaker", content="says")
    row = {"chat": [{"speaker": "user", "says": "hi"}, {"speaker": "assistant", "says": "yo"}]}
    assert conv(row, columns=cols).messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_system_prompt_and_row_system_column():
    qa = {"question": "q", "answer": "a"}
    assert conv(qa, system_prompt="Be brief.").messages[0] == {"role": "system", "content": "Be brief."}
    assert conv({**qa, "system": "Row says."}, system_prompt="Be brief.").messages[0] == {"role": "system", "content": "Row says."}
    assert conv({**qa, "system": ""}, system_prompt="Be brief.").messages[0]["content"] == "Be brief."
    own = {"messages": [{"role": "system", "content": "Mine."}, U, A]}
    assert conv(own, system_prompt="Be brief.").messages == own["messages"]  # a row's own system message wins
    assert conv({"text": "t"}, system_prompt="Be brief.").messages == []  # plain text has no template


# -- row errors: exact where + field -----------------------------------------------------------


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ({"question": "q"}, "qa", "field 'answer': missing (columns in this row: ['question'])"),
        ({"question": "q", "answer": 4}, "qa", "field 'answer': expected a string, got int"),
        ({"question": None, "answer": "a"}, "qa", "field 'question': expected a string, got null"),
        ({"question": "  ", "answer": "a"}, "qa", "field 'question': empty"),
        ({"instruction": "i", "output": ""}, "alpaca", "field 'output': empty"),
        ({"instruction": "i", "input": 3, "output": "o"}, "alpaca", "field 'input': expected a string, got int"),
        ({"text": ""}, "text", "field 'text': empty"),
        ({"text": ["a"]}, "text", "field 'text': expected a string, got list"),
        ({"messages": "hi"}, "messages", "field 'messages': expected a list of messages, got str"),
        ({"messages": '[{"role": "user"'}, "messages",
         "field 'messages': malformed JSON list (Expecting ',' delimiter at column 17)"),
        ({"messages": []}, "messages", "field 'messages': empty list of messages"),
        ({"other": []}, "messages", "field 'messages': missing (columns in this row: ['other'])"),
        ({"messages": [U, "hello"]}, "messages", "field 'messages[1]': expected an object with 'role' and 'content', got str"),
        ({"messages": [U, A, {"role": "bot", "content": "x"}]}, "messages",
         "field 'messages[2].role': unknown role 'bot' (expected system, user, assistant, tool)"),
        ({"messages": [{"content": "x"}, A]}, "messages", "field 'messages[0].role': missing"),
        ({"messages": [{"role": "user"}, A]}, "messages", "field 'messages[0].content': missing"),
        ({"messages": [U, {"role": "assistant", "content": None}]}, "messages", "field 'messages[1].content': expected a string, got null"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}, A]}, "messages",
         "field 'messages[0].content': expected a string, got list"),
        ({"messages": [{"role": "system", "content": "s"}, U]}, "messages",
         "field 'messages': no assistant message, so nothing to train on (add an assistant turn, or use data.train_on=all)"),
    ],
)
def test_row_errors(row, fmt, message):
    assert err(row, fmt) == f"{W}: {message}"


def test_no_assistant_allowed_when_training_on_all():
    assert conv({"messages": [U]}, require_assistant=False).messages == [U]


# -- every format from every file type ---------------------------------------------------------

FORMAT_ROWS = {
    "qa": {"question": "2+2?", "answer": "4"},
    "alpaca": {"instruction": "Add", "input": "2 2", "output": "4"},
    "text": {"text": "two plus two is four"},
    "messages": {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
}


def _write_rows(path, rows):
    ext = path.suffix
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    else:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet", ""])
def test_every_format_from_every_file_type(tmp_path, fmt, ext):
    row = FORMAT_ROWS[fmt]
    if fmt == "messages" and ext == ".csv":
        row = {"messages": json.dumps(row["messages"])}  # CSV cells hold the list as JSON text
    path = tmp_path / f"data{ext}"
    _write_rows(path, [row, row])
    records = read_records(str(path))
    assert detect_format(records, COLS) == fmt
    c = to_conversation(records[1], fmt, COLS)
    assert c.where.endswith(":line 2" if ext == ".jsonl" else ":row 2")
    if fmt == "text":
        assert c.text == "two plus two is four"
    else:
        assert c.messages[-1] == {"role": "assistant", "content": "4"}
        assert c.messages[0]["content"] == ("Add\n\n2 2" if fmt == "alpaca" else "2+2?")
