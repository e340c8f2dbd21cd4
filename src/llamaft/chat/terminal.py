"""Terminal chat with a run directory or a model directory (`llamaft chat PATH`).

    chat_loop("runs/demo", system="You are terse.", temperature=0.7)

Replies stream as they are generated, with the model's chat template and stop tokens (through
`llamaft.model.generate`, shared with the web UI and evaluation). Commands: /reset clears the
history, /exit (or Ctrl-D) quits, Ctrl-C interrupts a reply (or quits at the prompt).
Input and output are injectable so tests can script a conversation.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator, TextIO

from ..model.generate import GenParams, stream_chat
from ..model.inference import enclosing_run, run_system_prompt

HELP = "commands: /reset (new conversation), /exit (quit); Ctrl-C stops a reply"


def chat_loop(path, system: str | None = None, temperature: float = 0.7, top_p: float = 0.9,
              max_new_tokens: int = 512, top_k: int = 0, repetition_penalty: float = 1.0, *,
              input_fn: Callable[[str], str] = input, out: TextIO = sys.stdout, loaded=None,
              dtype: str | None = None, device: str | None = None) -> list[dict]:
    """Run the chat until /exit or EOF; returns the last conversation (for tests and callers).

    loaded: an already loaded (model, tokenizer, rules), e.g. from a caller that shows a spinner.
    """
    params = GenParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                       repetition_penalty=repetition_penalty)  # invalid settings fail before loading
    if loaded is None:
        from ..model.inference import load_for_inference

        out.write(f"loading {path} ...\n")
        out.flush()
        loaded = load_for_inference(path, dtype=dtype, device=device)
    model, tokenizer, rules = loaded
    system = default_system(path, system, out)
    return repl(lambda history: stream_chat(model, tokenizer, rules, history, params), system, input_fn=input_fn, out=out)


def default_system(path, system: str | None, out: TextIO) -> str | None:
    """`--system` when given (`--system ''` for none), else the system prompt the run trained with
    (also for RUN/merged and a GGUF exported into RUN), shown so the user knows what the model sees."""
    if system is not None:
        return system
    found = run_system_prompt(enclosing_run(path)) or None
    if found:
        out.write(f"system prompt (the run's data.system_prompt; --system to change): {found}\n")
    return found


def repl(stream: Callable[[list[dict]], Iterator[str]], system: str | None = None, *,
         input_fn: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[dict]:
    """The read-reply loop shared by every backend (transformers here, llama.cpp for .gguf files):
    `stream(history)` yields the reply's text pieces."""

    def fresh() -> list[dict]:
        return [{"role": "system", "content": system}] if system else []

    history = fresh()
    out.write(HELP + "\n")
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = fresh()
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/") and " " not in text:
            out.write(f"unknown command {text}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        out.write("assistant> ")
        out.flush()
        reply = []
        pieces = stream(history)
        try:
            for piece in pieces:
                reply.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            close = getattr(pieces, "close", None)
            if close:
                close()  # cancels the generation
            history.pop()  # an interrupted exchange is not part of the conversation
            out.write("\n(interrupted)\n")
            continue
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return history
