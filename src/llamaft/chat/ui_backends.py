"""What the web UI talks to: the fine-tuned model and, for side-by-side, its base.

    models = resolve_models("runs/demo", base=False)
    for piece in models.tuned.stream(messages, GenParams()): ...
    for piece in models.base().stream(messages, GenParams()): ...    # loaded on first use

Every HF backend streams through `llamaft.model.generate.stream_chat` (the one generation function);
.gguf files go through `llamaft.chat.gguf_backend` (llama.cpp), which owns GGUF chat templates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import LlamaftError
from ..model.generate import GenParams, stream_chat
from ..model.inference import enclosing_run, run_system_prompt

Stream = Callable[[list, GenParams], Iterator[str]]


@dataclass
class Backend:
    label: str      # shown above its chat column
    stream: Stream  # (messages with an optional leading system message, params) -> text deltas


@dataclass
class Models:
    tuned: Backend
    base_label: str                           # what side-by-side compares against
    base_note: str                            # shown under the switch: the base, or why it is off
    base_loader: Callable[[], Backend] | None  # None: side-by-side unavailable
    run_dir: Path | None = None               # for the summary panel
    default_system: str = ""                  # the run's data.system_prompt
    _base: Backend | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def base_available(self) -> bool:
        return self.base_loader is not None

    def base(self) -> Backend:
        """The base backend, loaded once (a full-fine-tune base is a second copy of the weights,
        so it is loaded only when side-by-side is first used)."""
        if self.base_loader is None:
            raise LlamaftError(f"side-by-side is unavailable: {self.base_note}")
        with self._lock:
            if self._base is None:
                self._base = self.base_loader()
            return self._base


def hf_backend(label: str, loaded) -> Backend:
    model, tokenizer, rules = loaded
    return Backend(label, lambda messages, params: stream_chat(model, tokenizer, rules, messages, params))


def adapter_off_backend(label: str, loaded) -> Backend:
    """The base of a LoRA run without loading it again: PEFT's switch turns the adapter off on the
    very weights the run was trained on (what load_for_inference(run, adapter=False) would build).
    The whole stream stays inside the switch (the generation thread reads it); the UI runs one
    generation at a time, so the fine-tuned stream never sees the adapter off."""
    model, tokenizer, rules = loaded

    def stream(messages, params):
        with model.disable_adapter():
            yield from stream_chat(model, tokenizer, rules, messages, params)

    return Backend(label, stream)


def gguf_backend(path: Path) -> Backend:
    """llama.cpp through llamaft.chat.gguf_backend: load_gguf(path) -> handle and
    stream_chat_gguf(handle, messages, params) -> Iterator[str]."""
    from . import gguf_backend as gb

    handle, stream = gb.load_gguf(str(path)), gb.stream_chat_gguf
    return Backend(f"{path.name} (llama.cpp)", lambda messages, params: stream(handle, messages, params))


def load_backend(path: Path, label: str) -> Backend:
    """Any chat-able path: .gguf file, run dir (with its adapter) or model dir."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LlamaftError(f"{path}: no such file")
        return gguf_backend(path)
    from ..model.inference import load_for_inference

    return hf_backend(label, load_for_inference(path))


def resolve_models(path: str | Path, base: bool | str | Path = False) -> Models:
    """Load the fine-tuned model now and decide where its base comes from (see ui.py's docstring)."""
    p = Path(str(path)).expanduser()
    explicit = base if isinstance(base, (str, Path)) and str(base) else None
    if p.suffix == ".gguf":
        tuned, run_dir, kind = load_backend(p, p.name), None, "gguf"
    else:
        from ..model.inference import load_for_inference, resolve_source

        src = resolve_source(p)  # errors before any weights load
        kind, run_dir = src.kind, src.run_dir
        loaded = load_for_inference(p)
        tuned = hf_backend({"adapter": "LoRA adapter", "full": "full fine-tune"}.get(kind, "model"), loaded)
    if explicit is not None:
        b = Path(str(explicit)).expanduser()
        loader, label, note = (lambda: load_backend(b, "base")), str(b), f"base: {b}"
    elif kind == "adapter" and hasattr(loaded[0], "disable_adapter"):
        base_backend = adapter_off_backend("base", loaded)
        loader, label, note = (lambda: base_backend), "adapter off", "the same weights with the LoRA adapter switched off"
    elif kind == "full":
        from ..model.inference import load_for_inference

        loader, label = (lambda: hf_backend("base", load_for_inference(p, adapter=False))), "the run's base model"
        note = "the run's base model (a second copy of the weights, loaded when first switched on)"
    elif kind == "model" and (parent := enclosing_run(p)) is not None:
        from ..model.inference import load_for_inference

        run_dir, tuned.label = parent, "merged model"
        loader, label = (lambda: hf_backend("base", load_for_inference(parent, adapter=False))), f"base of {parent.name}"
        note = f"the base model of the run {parent} that holds this merged model (loaded when first switched on)"
    else:
        loader, label = None, "unavailable"
        note = (f"off: {p.name} does not record its base model; restart with --base PATH "
                "(the base model directory) to compare")
        if base is True:
            raise LlamaftError(f"{p}: side-by-side needs the base model, and this {'file' if kind == 'gguf' else 'model directory'} "
                               "does not record it; pass --base PATH (the base model directory)")
    return Models(tuned, label, note, loader, run_dir, run_system_prompt(run_dir))
