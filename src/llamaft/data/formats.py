"""Raw rows -> conversations: the one place that knows the row formats.

    fmt = detect_format(records, cfg.data.columns)            # "messages" | "alpaca" | "qa" | "text"
    conv = to_conversation(records[0], fmt, cfg.data.columns, system_prompt="Be brief.")

Formats (column names come from `data.columns.*`):

- ``messages``: a list of ``{role, content}`` (extra keys such as ``tool_calls``, ``tool_call_id``
  and ``name`` pass through untouched). Roles: system, user, assistant, tool; ``ipython`` (Llama 3.1's
  name for tool output) is read as tool. An optional ``tools`` column (tool definitions) is passed
  to the chat template. In CSV the cell holds the list as JSON text. ShareGPT rows (a ``conversations`` column of
  ``{from, value}`` with human/gpt) are accepted too.
- ``alpaca``: instruction [+ "\\n\\n" + input] -> user, output -> assistant.
- ``qa``: question -> user, answer -> assistant (``query``/``response`` and ``prompt``/``completion``
  are recognised when the column names are left at their defaults).
- ``text``: plain language-model text; no template, all of it is trained.
- ``preference``: ``chosen`` + ``rejected`` (+ ``prompt``) columns, read by data/preference.py
  (train.objective dpo / orpo / simpo).

A row's own system column (``data.columns.system``) wins over ``data.system_prompt``; a
``messages`` row that already starts with a system message keeps it.
Bad rows raise `DataError` naming the row and the field, e.g.
``data.jsonl:line 7: field 'messages[2].role': unknown role 'bot' (expected system, user, assistant, tool)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..config import ColumnsConfig
from ..errors import DataError
from .sources import Record

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"ipython": "tool", "human": "user", "gpt": "assistant"}
# Common alternative column names, used only when the user left the configured name at its default.
COLUMN_ALIASES = {"question": ("query", "prompt"), "answer": ("response", "completion"), "messages": ("conversations",)}
_DEFAULTS = ColumnsConfig()


@dataclass
class Conversation:
    """A chat as role/content dicts, or (format=text) plain text that is trained whole."""

    messages: list[dict]
    where: str
    text: str | None = None
    tools: list | None = None  # tool (function) definitions of a messages row, passed to the chat template


def _column(keys, columns: ColumnsConfig, field: str) -> str | None:
    """The column holding `field` in a row with these keys (the configured name, else a known alias)."""
    name = getattr(columns, field)
    if name in keys:
        return name
    if name == getattr(_DEFAULTS, field):
        return next((alias for alias in COLUMN_ALIASES.get(field, ()) if alias in keys), None)
    return None


def detect_format(records: list[Record], columns: ColumnsConfig) -> str:
    """The row format, from the first record's columns."""
    first = records[0]
    keys = set(first.data)
    if columns.chosen in keys and columns.rejected in keys:
        return "preference"  # data/preference.py reads these rows
    if _column(keys, columns, "messages"):
        return "messages"
    if columns.instruction in keys and columns.output in keys:
        return "alpaca"
    if _column(keys, columns, "question") and _column(keys, columns, "answer"):
        return "qa"
    if columns.text in keys:
        return "text"
    c = columns
    raise DataError(
        first.where,
        f"cannot tell the data format from the columns {sorted(keys)}; expected '{c.messages}' (messages), "
        f"'{c.instruction}'+'{c.output}' (alpaca), '{c.question}'+'{c.answer}' (qa) or '{c.text}' (text). "
        "Name your columns with data.columns.* (e.g. data.columns.question=prompt) or set data.format",
    )


def to_conversation(record: Record, fmt: str, columns: ColumnsConfig, system_prompt: str | None = None,
                    *, require_assistant: bool = True) -> Conversation:
    """One row as a Conversation; `require_assistant` (completion training) rejects chats with no assistant turn."""
    where = record.where
    tools = None
    if fmt == "text":
        return Conversation([], where, text=_string(record, columns.text, allow_empty=False))
    if fmt == "qa":
        keys = record.data.keys()
        q = _string(record, _column(keys, columns, "question") or columns.question, allow_empty=False)
        a = _string(record, _column(keys, columns, "answer") or columns.answer, allow_empty=False)
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    elif fmt == "alpaca":
        instruction = _string(record, columns.instruction, allow_empty=False)
        extra = _string(record, columns.input, allow_empty=True, optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(record, columns.output, allow_empty=False)}]
    elif fmt == "messages":
        messages = _messages(record, columns)
        tools = _tools(record)
    else:
        raise DataError(where, f"unknown data format '{fmt}' (expected text, qa, alpaca, messages)")

    if not any(m["role"] == "system" for m in messages):
        row_system = _string(record, columns.system, allow_empty=True, optional=True)
        system = row_system if row_system.strip() else system_prompt
        if system:
            messages.insert(0, {"role": "system", "content": system})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(where, f"field '{columns.messages}': no assistant message, so nothing to train on "
                        "(add an assistant turn, or use data.train_on=all)")
    return Conversation(messages, where, tools=tools)


def row_tools(record: Record) -> list | None:
    """The row's tool definitions (preference rows pass them to the template like messages rows)."""
    return _tools(record)


def _tools(record: Record) -> list | None:
    """An optional `tools` column: a list of tool definitions (JSON text in CSV)."""
    raw = record.data.get("tools")
    if isinstance(raw, str) and raw.strip():
        raw = _json_list(raw, record.where, "tools")
    if raw is None or raw == "" or raw == []:
        return None
    if not isinstance(raw, (list, tuple)) or not all(isinstance(t, dict) for t in raw):
        raise DataError(record.where, f"field 'tools': expected a list of tool definitions (objects), got {_type(raw)}")
    return list(raw)


def _string(record: Record, column: str, *, allow_empty: bool, optional: bool = False) -> str:
    if column not in record.data:
        if optional:
            return ""
        raise DataError(record.where, f"field '{column}': missing (columns in this row: {sorted(record.data)})")
    value = record.data[column]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(record.where, f"field '{column}': expected a string, got {_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(record.where, f"field '{column}': empty")
    return value


def _messages(record: Record, columns: ColumnsConfig) -> list[dict]:
    where = record.where
    col = _column(record.data.keys(), columns, "messages") or columns.messages
    if col not in record.data:
        raise DataError(where, f"field '{col}': missing (columns in this row: {sorted(record.data)})")
    return parse_messages(record.data[col], col, where, columns)


def parse_messages(raw, col: str, where: str, columns: ColumnsConfig) -> list[dict]:
    """A cell holding a list of messages (JSON text in CSV) as checked {role, content, ...} dicts."""
    if isinstance(raw, str) and raw.lstrip().startswith("["):
        raw = _json_list(raw, where, col)  # CSV cells can only hold messages as JSON text
    if not isinstance(raw, (list, tuple)):  # tuple: some readers hand sequences back as tuples
        raise DataError(where, f"field '{col}': expected a list of messages, got {_type(raw)}")
    if not raw:
        raise DataError(where, f"field '{col}': empty list of messages")
    return [_message(m, f"{col}[{i}]", where, columns) for i, m in enumerate(raw)]


def _json_list(text: str, where: str, col: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(where, f"field '{col}': malformed JSON list ({err.msg} at column {err.colno})") from None


def _message(m, field: str, where: str, columns: ColumnsConfig) -> dict:
    if not isinstance(m, dict):
        raise DataError(where, f"field '{field}': expected an object with '{columns.role}' and '{columns.content}', got {_type(m)}")
    # ShareGPT rows use from/value; read them when the configured keys are absent.
    role_key = columns.role if columns.role in m or "from" not in m else "from"
    content_key = columns.content if columns.content in m or "value" not in m else "value"
    if role_key not in m:
        raise DataError(where, f"field '{field}.{columns.role}': missing")
    role = m[role_key]
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise DataError(where, f"field '{field}.{role_key}': unknown role {m[role_key]!r} (expected {', '.join(ROLES)})")
    content = m.get(content_key)
    if content is None and role == "assistant" and m.get("tool_calls"):
        content = ""  # OpenAI-style tool-call turns carry content: null
    elif content_key not in m:
        raise DataError(where, f"field '{field}.{content_key}': missing")
    elif not isinstance(content, str):
        raise DataError(where, f"field '{field}.{content_key}': expected a string, got {_type(content)}")
    out = {"role": role, "content": content}
    # Parquet / datasets give every message the union of all keys, None where absent; a template
    # that tests `'tool_calls' in message` would misread those, so None-valued extras are dropped.
    out.update({k: v for k, v in m.items() if k not in (role_key, content_key, "role", "content") and v is not None})
    return out


def _type(value) -> str:
    return "null" if value is None else type(value).__name__
