"""The web UI's conversations, without widgets: what Send / Regenerate / Stop / Clear do to a session.

    state = new_state()
    for state, status in submit(models, state, "Hi", system="Be terse.", side=True, params=GenParams()):
        ...   # state["tuned"] / state["base"] grow piece by piece while the replies stream

Pure Python over `ui_backends.Models` (no gradio import): tests/chat/test_ui.py drives it directly, and
ui.py only turns these generators into widget updates.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

from ..model.generate import GenParams
from .ui_backends import Models

EMPTY = "_(empty reply: the model stopped at once)_"
CURSOR = " ▌"


def new_state() -> dict:
    """Per-browser-session conversations, system prompt excluded (it is read fresh every turn)."""
    return {"tuned": [], "base": [], "active": None}  # active: the conversation being streamed


def view(messages: list[dict], pending: bool = False) -> list[dict]:
    """Chatbot value for one conversation: a cursor on the reply being streamed, a note on an empty
    one, and a label on replies the base column only holds as context (see _sync_base)."""
    out = []
    for m in messages:
        content = m["content"]
        if m.get("context"):
            content = f"_(fine-tuned reply, kept as context)_\n\n{content}"
        out.append({"role": m["role"], "content": content})
    if out and out[-1]["role"] == "assistant":
        if pending:
            out[-1]["content"] += CURSOR
        elif not out[-1]["content"].strip():
            out[-1]["content"] = EMPTY
    return out


def rendered(steps: Iterator[tuple[dict, str]]) -> Iterator[tuple[dict, list[dict], list[dict], str]]:
    """(state, tuned view, base view, status) for each (state, status) of a turn: the column being
    streamed shows the cursor; a last step repeats the final state without it."""
    for state, status in steps:
        active = state.get("active")
        yield state, view(state["tuned"], active == "tuned"), view(state["base"], active == "base"), status
    yield state, view(state["tuned"]), view(state["base"]), status


def params_from_sliders(temperature, top_p, top_k, max_new_tokens, repetition_penalty) -> GenParams:
    """The sampling sliders' values (numbers or the text typed into their boxes) as GenParams."""
    return GenParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                     max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty))


def _users(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def _sync_base(state: dict) -> None:
    """Side-by-side switched on mid-conversation: the base model gets the conversation so far (the
    fine-tuned replies included), so both models answer the same next prompt in the same context."""
    if _users(state["base"]) != _users(state["tuned"]):
        state["base"] = [dict(m, context=m["role"] == "assistant") for m in state["tuned"]]


def turn(models: Models, state: dict, system: str, side: bool, params: GenParams,
         stop: threading.Event | None = None) -> Iterator[tuple[dict, str]]:
    """Stream replies to the last user message: fine-tuned model first, then (side-by-side) the base.

    Sequential on purpose: on one GPU (or a CPU) two concurrent generations are no faster, and with a
    LoRA run the base is the same weights with the adapter switched off, which must not overlap.
    Yields (state, status) after every text piece; the state holds the partial replies.
    `stop` (the Stop button): checked between pieces; the generation is closed, which cancels the
    model's thread (stream_chat), and a base reply not started yet is not asked for.
    """
    prefix = [{"role": "system", "content": system}] if system and system.strip() else []
    started = time.time()
    stopped = lambda: stop is not None and stop.is_set()  # noqa: E731
    for key in ["tuned", "base"] if side else ["tuned"]:
        conv = state[key]
        if stopped():
            if conv and conv[-1]["role"] == "user":
                conv.pop()  # unanswered: the next side-by-side turn re-syncs this column (_sync_base)
            break
        backend = models.tuned if key == "tuned" else models.base()
        yield from _reply(backend, state, key, prefix, params, stopped)
    yield state, f"{'stopped after' if stopped() else 'done in'} {time.time() - started:.1f} s"


def _reply(backend, state: dict, key: str, prefix: list[dict], params: GenParams, stopped) -> Iterator[tuple[dict, str]]:
    """One model's reply to conversation `key`, appended to it piece by piece."""
    conv = state[key]
    messages = prefix + [{"role": m["role"], "content": m["content"]} for m in conv]
    conv.append({"role": "assistant", "content": ""})
    state["active"] = key
    yield state, f"generating ({backend.label}) …"
    pieces = backend.stream(messages, params)
    try:
        for piece in pieces:
            if stopped():
                break
            conv[-1]["content"] += piece
            yield state, f"generating ({backend.label}) …"
    finally:
        state["active"] = None
        if hasattr(pieces, "close"):  # a generator: closing it cancels the model's thread
            pieces.close()


def submit(models: Models, state: dict, message: str, system: str, side: bool, params: GenParams,
           stop: threading.Event | None = None):
    """A new user message; yields (state, status) as turn() does."""
    if not message or not message.strip():
        yield state, "type a message first"
        return
    if side:
        _sync_base(state)
    for key in ("tuned", "base") if side else ("tuned",):
        state[key].append({"role": "user", "content": message})
    yield from turn(models, state, system, side, params, stop)


def regenerate(models: Models, state: dict, system: str, side: bool, params: GenParams,
               stop: threading.Event | None = None):
    """Drop the last replies and answer the last user message again (new sample unless greedy)."""
    for key in ("tuned", "base"):
        while state[key] and state[key][-1]["role"] == "assistant":
            state[key].pop()
    if not state["tuned"]:
        yield state, "nothing to regenerate yet"
        return
    if side:
        _sync_base(state)
    yield from turn(models, state, system, side, params, stop)


class Stops:
    """One stop flag per browser session (gr.Request.session_hash): Stop sets it, the running turn reads it."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}

    def fresh(self, session: str) -> threading.Event:
        """A new, unset flag for the turn starting now in this session."""
        flag = self._flags[session] = threading.Event()
        return flag

    def finish(self, session: str) -> None:
        self._flags.pop(session, None)

    def running(self, session: str, gen):
        """Run the turn generator `gen(flag)` with a fresh flag, forgetting it when the turn ends."""
        try:
            yield from gen(self.fresh(session))
        finally:
            self.finish(session)

    def stop(self, session: str) -> bool:
        flag = self._flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True
