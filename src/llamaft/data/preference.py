"""Preference rows (train.objective dpo / orpo / simpo) -> checked prompt / chosen / rejected pairs.

    pair = to_pair(record, cfg.data.columns, system_prompt=None)   # PreferencePair, or DataError naming the field
    ex = chat.encode_pair(pair, tokenizer, rules)                   # token ids: data/chat.py renders them

Shapes a row may take (column names from data.columns.prompt / chosen / rejected), as TRL's
preference format and the recipes built on it accept them:

- ``prompt`` text or a messages list, ``chosen`` / ``rejected`` text or a list holding one assistant
  message (the completion);
- no ``prompt``: ``chosen`` / ``rejected`` are whole conversations that share every message but the
  last, which is the assistant's answer.

In CSV a messages cell holds the list as JSON text. A row's system column or data.system_prompt
is added when the prompt has no system message, as for SFT rows. Bad rows raise one DataError
naming file:row and the field: a missing field, an empty completion, chosen == rejected, prompts
that differ between the two conversations, a completion that is not one assistant message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import DataError
from .formats import parse_messages, row_tools
from .sources import Record


@dataclass
class PreferencePair:
    """One preference row: the prompt messages and two assistant answers to it."""

    prompt: list[dict]  # system / user / ... messages before the answer
    chosen: dict  # {"role": "assistant", "content": ...}
    rejected: dict
    where: str
    tools: list | None = None
    text: str | None = None  # never plain text (generation metrics read `text` like a Conversation's)

    @property
    def messages(self) -> list[dict]:
        """The chosen conversation: generation metrics score the model's answer against `chosen`."""
        return self.prompt + [self.chosen]


def to_pair(record: Record, columns, system_prompt: str | None = None) -> PreferencePair:
    """One preference row as a PreferencePair (see the module docstring for the shapes)."""
    where, data = record.where, record.data
    for col in (columns.chosen, columns.rejected):
        if col not in data or data[col] is None:
            raise DataError(where, f"field '{col}': missing (columns in this row: {sorted(data)})")
    has_prompt = data.get(columns.prompt) not in (None, "")
    if has_prompt:
        prompt = _prompt(data[columns.prompt], columns.prompt, where, columns)
        chosen = _completion(data[columns.chosen], columns.chosen, where, columns)
        rejected = _completion(data[columns.rejected], columns.rejected, where, columns)
    else:
        prompt, chosen, rejected = _split_conversations(data, where, columns)
    for col, answer in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if not str(answer.get("content") or "").strip() and not answer.get("tool_calls"):
            raise DataError(where, f"field '{col}': empty completion")
    if chosen == rejected:
        raise DataError(where, f"field '{columns.rejected}': identical to '{columns.chosen}' (nothing to prefer)")
    if not any(m["role"] == "system" for m in prompt):
        row_system = data.get(columns.system)
        system = row_system if isinstance(row_system, str) and row_system.strip() else system_prompt
        if system:
            prompt = [{"role": "system", "content": system}] + prompt
    return PreferencePair(prompt, chosen, rejected, where, tools=row_tools(record))


def _is_messages(value) -> bool:
    """A list of messages, or (CSV) its JSON text; any other string is plain text."""
    if isinstance(value, (list, tuple)):
        return True
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            return isinstance(json.loads(value), list)
        except json.JSONDecodeError:
            return False
    return False


def _prompt(value, col: str, where: str, columns) -> list[dict]:
    if isinstance(value, str) and not _is_messages(value):
        if not value.strip():
            raise DataError(where, f"field '{col}': empty")
        return [{"role": "user", "content": value}]
    messages = parse_messages(value, col, where, columns)
    if messages[-1]["role"] == "assistant":
        raise DataError(where, f"field '{col}': ends with an assistant message; the prompt is what comes before the answer "
                        f"(put the answers in '{columns.chosen}' / '{columns.rejected}')")
    return messages


def _completion(value, col: str, where: str, columns) -> dict:
    if isinstance(value, str) and not _is_messages(value):
        return {"role": "assistant", "content": value}
    messages = parse_messages(value, col, where, columns)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(where, f"field '{col}': expected one assistant message (the completion), got [{roles}]; "
                        f"whole conversations go without a '{columns.prompt}' column")
    return messages[0]


def _split_conversations(data: dict, where: str, columns) -> tuple[list[dict], dict, dict]:
    """Whole chosen / rejected conversations -> (shared prompt, chosen answer, rejected answer)."""
    convs = []
    for col in (columns.chosen, columns.rejected):
        if not _is_messages(data[col]):
            raise DataError(where, f"field '{columns.prompt}': missing; with '{col}' as plain text the row needs a prompt "
                            f"(or give '{columns.chosen}' / '{columns.rejected}' as whole conversations)")
        conv = parse_messages(data[col], col, where, columns)
        if conv[-1]["role"] != "assistant":
            raise DataError(where, f"field '{col}': the conversation must end with the assistant's answer")
        if len(conv) < 2:
            raise DataError(where, f"field '{col}': no prompt before the answer (give the user turn, or a '{columns.prompt}' column)")
        convs.append(conv)
    (chosen, rejected) = convs
    if chosen[:-1] != rejected[:-1]:
        n = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b), min(len(chosen), len(rejected)) - 1)
        raise DataError(where, f"field '{columns.rejected}[{n}]': the prompt differs between the two conversations "
                        f"(every message but the last answer must be the same as in '{columns.chosen}')")
    return chosen[:-1], chosen[-1], rejected[-1]


def check_objective_formats(objective: str, formats: dict[str, str]) -> None:
    """Every file fits train.objective: preference rows for dpo / orpo / simpo, SFT rows for sft (DataError naming the file)."""
    for path, fmt in formats.items():
        if objective != "sft" and fmt != "preference":
            raise DataError(path, f"train.objective={objective} needs preference rows ('prompt' + 'chosen' / 'rejected', "
                            f"or whole 'chosen' / 'rejected' conversations); this file reads as {fmt} rows")
        if objective == "sft" and fmt == "preference":
            raise DataError(path, "preference rows (chosen / rejected): set train.objective=dpo, orpo or simpo "
                            "(train.objective=sft needs text, qa, alpaca or messages rows)")
