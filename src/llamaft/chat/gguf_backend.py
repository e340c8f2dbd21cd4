"""Chat with a .gguf file through llama.cpp (llama-cpp-python): `llamaft chat FILE.gguf`.

    handle = load_gguf("demo.q8_0.gguf")
    for piece in stream_chat_gguf(handle, [{"role": "user", "content": "Hi"}], GenParams()):
        print(piece, end="")

The prompt is rendered with the chat template stored in the GGUF (Jinja, the same renderer rules as
transformers: trim_blocks/lstrip_blocks, raise_exception, strftime_now), tokenized by llama.cpp with
special tokens parsed, and generation stops on llama.cpp's end-of-generation ids (EOS/EOT/EOM and
<|eot_id|>/<|im_end|>/...), which is exactly what the export writes and `check_gguf` verifies.
"""

from __future__ import annotations

import codecs
import json
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator, TextIO

from ..errors import LlamaftError
from ..model.generate import GenParams


@dataclass
class GGUFChat:
    llm: object  # llama_cpp.Llama
    template: object  # compiled Jinja template
    bos: str
    eos: str
    path: str


def _render_env():
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    # transformers' tojson keeps non-ASCII and does not HTML-escape (Jinja's built-in does).
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(llm, tid) -> str:
    import llama_cpp

    if tid is None or int(tid) < 0:
        return ""
    return llama_cpp.llama_vocab_get_text(llm._model.vocab, int(tid)).decode("utf-8", errors="replace")


def load_gguf(path, n_ctx: int = 4096) -> GGUFChat:
    """Open a GGUF for chatting (CPU); LlamaftError without llama-cpp-python or a chat template."""
    from pathlib import Path

    from ..export.gguf_check import llama_cpp_available, open_gguf

    if not Path(path).is_file():
        raise LlamaftError(f"{path}: no such GGUF file")
    if not llama_cpp_available():  # open_gguf's own advice (--no-check) is export's, not chat's
        raise LlamaftError(
            f"{path}: chatting with a GGUF needs llama.cpp's Python binding: run scripts/build_llama_cpp_wheel.sh "
            "(or `pip install llama-cpp-python`), or chat with the run or merged model directory instead"
        )

    llm = open_gguf(path, n_ctx=n_ctx)
    meta = llm.metadata
    src = meta.get("tokenizer.chat_template")
    if not src:
        raise LlamaftError(f"{path}: the GGUF has no chat template (tokenizer.chat_template); export it from a chat model")
    n_train = int(meta.get("llama.context_length", n_ctx))
    if n_train < n_ctx:  # the KV cache never needs more than the model was trained for
        llm.close()
        llm = open_gguf(path, n_ctx=n_train)
    return GGUFChat(llm, _render_env().from_string(src), _token_text(llm, meta.get("tokenizer.ggml.bos_token_id")),
                    _token_text(llm, meta.get("tokenizer.ggml.eos_token_id")), str(path))


def prompt_tokens(handle: GGUFChat, messages: list[dict]) -> list[int]:
    """The generation prompt: template rendered with add_generation_prompt, specials parsed."""
    text = handle.template.render(messages=messages, add_generation_prompt=True,
                                  bos_token=handle.bos, eos_token=handle.eos)
    # Templates that write bos_token themselves (Llama 3) must not get a second one from llama.cpp.
    add_bos = not (handle.bos and text.startswith(handle.bos))
    return handle.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def stream_chat_gguf(handle: GGUFChat, messages: list[dict], params: GenParams | None = None) -> Iterator[str]:
    """Text deltas of the assistant reply; stops on an end-of-generation token or max_new_tokens."""
    import llama_cpp

    params = params or GenParams()
    llm = handle.llm
    ids = prompt_tokens(handle, messages)
    budget = min(params.max_new_tokens, llm.n_ctx() - len(ids))
    if budget <= 0:
        raise LlamaftError(f"the conversation ({len(ids)} tokens) fills the context ({llm.n_ctx()}); /reset it")
    vocab = llm._model.vocab
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    gen = llm.generate(ids, temp=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=0.0,
                       repeat_penalty=params.repetition_penalty)
    try:
        for n, tid in enumerate(gen):
            if llama_cpp.llama_vocab_is_eog(vocab, tid):
                break
            piece = decoder.decode(llm.detokenize([tid]))
            if piece:
                yield piece
            if n + 1 >= budget:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
    finally:
        gen.close()


def chat_loop_gguf(path, system: str | None = None, temperature: float = 0.7, top_p: float = 0.9,
                   max_new_tokens: int = 512, top_k: int = 0, repetition_penalty: float = 1.0, *,
                   input_fn: Callable[[str], str] = input, out: TextIO | None = None, handle: GGUFChat | None = None) -> list[dict]:
    """Terminal chat over a GGUF (same commands as `chat.terminal.chat_loop`); returns the conversation."""
    out = out or sys.stdout  # looked up now, not at import (a replaced sys.stdout must be honoured)
    params = GenParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                       repetition_penalty=repetition_penalty)
    if handle is None:
        out.write(f"loading {path} (llama.cpp) ...\n")
        handle = load_gguf(path)
    from .terminal import default_system, repl

    system = default_system(path, system, out)
    return repl(lambda history: stream_chat_gguf(handle, history, params), system, input_fn=input_fn, out=out)
