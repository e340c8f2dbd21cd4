"""Conversation -> (input_ids, labels): the ONLY place that knows templates and trained spans.

    python -c "from llamaft.data.chat import encode"   # used by data.pipeline and `llamaft data`

How (generic and exact for any prefix-stable Jinja template): render the template at the prefix
points of every assistant turn — messages[:i] with the generation prompt, then messages[:i+1] — so
the full render splits into prompt text and assistant text. Each piece is tokenized on its own and
the ids and labels are appended together (nanochat's `render_conversation` idea), so the mask
cannot drift from the template. An assistant piece is trained up to and including its closing
turn-end token (<|eot_id|>, <|eom_id|> for tool calls, <|im_end|>); text the template writes after
that token (ChatML's "\\n") is not. Tokenizing pieces separately is also what inference does:
the prompt is tokenized, the model writes the answer.

Preference pairs (`encode_pair`): the prompt + chosen and the prompt + rejected conversations are
each encoded as above with only the last assistant turn trained; the untrained prefix is the prompt
(identical for both), the trained span the completion (TRL's prompt_ids / chosen_ids / rejected_ids).

Plain formats (no chat template):
- `conv.text`: [bos if the tokenizer adds one] + text + eos, every token trained.
- base models with q/a or messages data: each non-assistant message is written as `content + "\\n\\n"`,
  each assistant message as `content + eos` (trained, eos included), after an optional bos.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from types import SimpleNamespace

from ..errors import DataError

# The label of a token that carries no loss (PyTorch's cross_entropy ignore_index); the one definition.
IGNORE_INDEX = -100
log = logging.getLogger(__name__)

# Base-model format as a template, so it goes through the same exact path as chat templates.
PLAIN_TEMPLATE = (
    "{{ plain_bos }}{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}{{ plain_eos }}"
    "{% else %}{{ m.content }}\n\n{% endif %}{% endfor %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss
    where: str


# ---------------------------------------------------------------------------------------------
# Rendering


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def _template(tokenizer, rules) -> tuple[str, dict]:
    if rules.instruct and rules.chat_template:
        return rules.chat_template, dict(rules.template_kwargs)
    bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
    eos = tokenizer.convert_ids_to_tokens(rules.eos_id)
    return PLAIN_TEMPLATE, {"plain_bos": bos, "plain_eos": eos}


def _render(tokenizer, template: str, kwargs: dict, messages: list[dict], gen: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=gen, **kwargs
        )
    except Exception as err:  # noqa: BLE001 - Jinja errors incl. the template's raise_exception
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(where, f"the chat template cannot render this conversation: {msg}") from None


def _special_pattern(tokenizer):
    # Content must not contain control-token text: the render would turn it into a real
    # <|eot_id|> (Meta's encoder would not), silently changing the turn structure.
    pat = getattr(tokenizer, "_llamaft_special_re", None)
    if pat is None:
        texts = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
        pat = re.compile("|".join(re.escape(t) for t in texts)) if texts else re.compile(r"(?!x)x")
        try:
            tokenizer._llamaft_special_re = pat
        except AttributeError:
            pass
    return pat


def _check_content(messages: list[dict], tokenizer, where: str) -> None:
    pat = _special_pattern(tokenizer)
    for n, m in enumerate(messages, 1):
        content = m.get("content")
        if isinstance(content, str):
            hit = pat.search(content)
            if hit:
                raise DataError(where, f"message {n} ({m.get('role')}) contains the special token text "
                                       f"'{hit.group(0)}'; remove it (it would act as a control token)")


def _segments(messages, tokenizer, template, kwargs, where) -> list[tuple[str, int | None]]:
    """Split the full render into (text, assistant message index or None) pieces."""
    full = _render(tokenizer, template, kwargs, messages, False, where)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tokenizer, template, kwargs, messages[:i], True, where) if i else ""
        upto = _render(tokenizer, template, kwargs, messages[: i + 1], False, where)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
            raise DataError(where, f"the chat template is not prefix-stable at message {i + 1} (rendering the "
                                   "conversation up to a turn does not give a prefix of the whole); cannot find "
                                   "the assistant spans — use a template that renders turns in order")
        pieces.append((full[pos:len(before)], None))
        pieces.append((full[len(before):len(upto)], i))
        pos = len(upto)
    pieces.append((full[pos:], None))
    return [(t, i) for t, i in pieces if t]


# ---------------------------------------------------------------------------------------------
# Public API


def encode(conv, tokenizer, rules, *, train_on: str = "completion", assistant_turns: str = "all") -> Example:
    """Token ids and labels of one conversation (labels -100 where there is no loss)."""
    where = getattr(conv, "where", "?")
    if getattr(conv, "text", None) is not None:
        return _encode_text(conv.text, tokenizer, rules, where)
    messages = list(conv.messages)
    if not messages:
        raise DataError(where, "conversation has no messages")
    _check_content(messages, tokenizer, where)
    template, kwargs = _template(tokenizer, rules)
    kwargs.update(tool_kwargs(conv))
    pieces = _segments(messages, tokenizer, template, kwargs, where)
    assistant = [i for _, i in pieces if i is not None]
    trained = set(assistant[-1:] if assistant_turns == "last" else assistant)
    turn_end = set(rules.turn_end_ids)
    ids: list[int] = []
    labels: list[int] = []
    for text, msg in pieces:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += toks
        if msg is None or msg not in trained:
            labels += [IGNORE_INDEX] * len(toks)
            continue
        ends = [k for k, t in enumerate(toks) if t in turn_end]
        cut = ends[-1] + 1 if ends else len(toks)  # no closing token known: train the whole span
        labels += toks[:cut] + [IGNORE_INDEX] * (len(toks) - cut)
    if train_on == "all":
        labels = list(ids)
    _verify(ids, pieces, tokenizer, where)
    return Example(ids, labels, where)


@dataclass
class PreferenceExample:
    """One preference pair as tokens (TRL's prompt_ids / chosen_ids / rejected_ids): the prompt exactly as
    SFT and inference render it, each completion through its end-of-turn token, every completion token trained."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str

    def side(self, name: str) -> Example:
        """prompt + the chosen or rejected completion as an Example (labels -100 on the prompt)."""
        completion = self.chosen_ids if name == "chosen" else self.rejected_ids
        return Example(self.prompt_ids + completion, [IGNORE_INDEX] * len(self.prompt_ids) + completion, self.where)


def encode_pair(pair, tokenizer, rules) -> PreferenceExample:
    """A data.preference.PreferencePair as tokens, through `encode`: each side is the conversation
    prompt + answer with only the last turn trained, so the prompt tokens are SFT's and the completion is
    exactly the trained span (the answer + its turn-end token; template text after that token is cut)."""
    sides = []
    for name in ("chosen", "rejected"):
        conv = SimpleNamespace(messages=pair.prompt + [getattr(pair, name)], where=pair.where, tools=pair.tools, text=None)
        ex = encode(conv, tokenizer, rules, train_on="completion", assistant_turns="last")
        trained = [k for k, label in enumerate(ex.labels) if label != IGNORE_INDEX]
        if not trained:
            raise DataError(pair.where, f"field '{name}': the answer renders to no token")
        sides.append((ex.input_ids[:trained[0]], ex.input_ids[trained[0]:trained[-1] + 1]))
    if sides[0][0] != sides[1][0]:
        raise DataError(pair.where, "field 'rejected': the chat template renders the prompt differently before the two answers")
    return PreferenceExample(sides[0][0], sides[0][1], sides[1][1], pair.where)


def _verify(ids: list[int], pieces, tokenizer, where: str) -> None:
    # Cheap check that piecewise tokenization equals tokenizing the whole render. They can only
    # differ when a piece boundary falls inside a BPE word; the pieces are kept (they are what
    # inference sees) but the user is told once.
    whole = tokenizer("".join(t for t, _ in pieces), add_special_tokens=False)["input_ids"]
    if whole != ids and not getattr(tokenizer, "_llamaft_warned", False):
        log.warning("%s: tokenizing the chat template piecewise differs from the whole render; "
                    "the template joins turns inside a word", where)
        try:
            tokenizer._llamaft_warned = True
        except AttributeError:
            pass


def _encode_text(text: str, tokenizer, rules, where: str) -> Example:
    if not isinstance(text, str) or not text:
        raise DataError(where, "text is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    ids = bos + ids + [rules.eos_id]
    return Example(ids, list(ids), where)


def tool_kwargs(conv) -> dict:
    """Optional tool definitions of a conversation (object or dict) as chat-template variables."""
    get = conv.get if isinstance(conv, dict) else (lambda k: getattr(conv, k, None))
    return {k: get(k) for k in ("tools", "builtin_tools") if get(k) is not None}


def prompt_ids(messages: list[dict], tokenizer, rules, tools: dict | None = None) -> list[int]:
    """Token ids of a generation prompt (ends with the assistant header) for chat and eval.
    `tools`: the conversation's tool_kwargs, so eval prompts render exactly as training did."""
    template, kwargs = _template(tokenizer, rules)
    kwargs.update(tools or {})
    text = _render(tokenizer, template, kwargs, list(messages), True, "prompt")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_trained(example: Example, tokenizer):
    """The decoded example with special tokens visible; trained (loss) spans in bold green."""
    from rich.text import Text  # display only (`llamaft data`): encoding never needs rich

    out = Text()
    start = 0
    n = len(example.input_ids)
    for k in range(1, n + 1):
        if k == n or (example.labels[k] != IGNORE_INDEX) != (example.labels[start] != IGNORE_INDEX):
            piece = tokenizer.decode(example.input_ids[start:k], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
            out.append(piece, style="bold green" if example.labels[start] != IGNORE_INDEX else "dim")
            start = k
    return out
