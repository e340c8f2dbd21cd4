"""The one generation module: terminal chat, web UI and evaluation all call these two functions.

    params = GenParams(temperature=0)                        # 0 → greedy
    for delta in stream_chat(model, tok, rules, [{"role": "user", "content": "Hi"}], params):
        print(delta, end="", flush=True)
    results = generate_batch(model, tok, rules, [prompt_ids_1, prompt_ids_2], params)   # left-padded

Both stop on every id in `rules.stop_ids` (Llama 3.1 Instruct has three), pad with `rules.pad_id`
(never EOS), and decode the same way, so a streamed reply equals the batched one token for token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..data.chat import prompt_ids
from ..errors import LlamaftError

# Same decoding everywhere. No space clean-up: it rewrites " ." → "." after the fact, which would make
# the streamed pieces differ from the final text.
DECODE_KWARGS = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


@dataclass
class GenParams:
    """Sampling settings shown in the chat UI; temperature 0 means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0                 # 0 = off
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise LlamaftError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LlamaftError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LlamaftError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise LlamaftError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise LlamaftError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


@dataclass
class GenResult:
    text: str              # the reply, decoded without special tokens
    token_ids: list[int]   # the reply's ids, without the stop token and padding
    stopped: bool          # True: ended on a stop id; False: ran into max_new_tokens
    n_tokens: int          # tokens the model generated, the stop token included


def generation_config(params: GenParams, rules) -> GenerationConfig:
    """Every field set explicitly: generate() fills unset (None) fields from the model's own
    generation_config.json (e.g. Llama's temperature 0.6 / top_p 0.9), which would make the UI's
    settings lie."""
    sample = params.temperature > 0
    # Greedy: sampling knobs left unset (they do nothing, and non-defaults only trigger warnings).
    return GenerationConfig(
        do_sample=sample,
        temperature=params.temperature if sample else None,
        top_p=params.top_p if sample else None,
        top_k=params.top_k if sample else None,
        repetition_penalty=params.repetition_penalty,
        max_new_tokens=params.max_new_tokens,
        eos_token_id=list(rules.stop_ids),
        pad_token_id=rules.pad_id,
        num_beams=1,
    )


def chat_prompt_ids(messages: list[dict], tokenizer, rules, tools: dict | None = None) -> list[int]:
    """Generation prompt (ends with the assistant header), from the one module that knows templates
    (base models get its plain-text rendering); `tools`: data.chat.tool_kwargs of the conversation."""
    return list(prompt_ids(messages, tokenizer, rules, tools))


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _Cancel(StoppingCriteria):
    """Ends generation when the consumer stops reading (UI 'stop', Ctrl-C, closed generator), so a
    background thread never keeps the model busy for the rest of max_new_tokens."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _ReplyStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that never shows stop tokens, even ones the tokenizer does not mark special."""

    def __init__(self, tokenizer, stop_ids, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, **kwargs)
        self.stop = set(stop_ids)

    def put(self, value):
        if self.next_tokens_are_prompt:
            return super().put(value)
        ids = [t for t in value.reshape(-1).tolist() if t not in self.stop]
        if ids:
            super().put(torch.tensor(ids))


def stream_chat(model, tokenizer, rules, messages: list[dict], params: GenParams | None = None) -> Iterator[str]:
    """Yield the assistant reply as text deltas; joined, they equal the full decoded reply.

    Generation runs in a thread (TextIteratorStreamer); closing the iterator early cancels it.
    Errors inside generate() are re-raised here.
    """
    params = params or GenParams()
    ids = chat_prompt_ids(messages, tokenizer, rules)
    yield from stream_ids(model, tokenizer, rules, ids, params)


def stream_ids(model, tokenizer, rules, ids: list[int], params: GenParams) -> Iterator[str]:
    """stream_chat for an already-built prompt."""
    device = _device(model)
    input_ids = torch.tensor([ids], device=device)
    cancel = threading.Event()
    streamer = _ReplyStreamer(tokenizer, rules.stop_ids, timeout=None, **DECODE_KWARGS)
    error: list[BaseException] = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=generation_config(params, rules),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancel(cancel)]),
                )
        except BaseException as exc:  # surfaced in the consumer thread below
            error.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        cancel.set()
        thread.join()
    if error:
        raise error[0]


def _pad_left(prompts: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _result(tokenizer, new_ids: list[int], stop: set[int]) -> GenResult:
    """Cut one generated row at its first stop id; what follows is padding added by generate()."""
    for i, t in enumerate(new_ids):
        if t in stop:
            reply = new_ids[:i]
            return GenResult(tokenizer.decode(reply, **DECODE_KWARGS), reply, True, i + 1)
    return GenResult(tokenizer.decode(new_ids, **DECODE_KWARGS), new_ids, False, len(new_ids))


def generate_batch(model, tokenizer, rules, prompts, params: GenParams | None = None, batch_size: int = 8) -> list[GenResult]:
    """Generate for many prompts, `batch_size` at a time, left-padded with `rules.pad_id`.

    prompts: token-id lists (already rendered with `prompt_ids`), or message lists, which are
    rendered here. Results keep the prompts' order. With temperature 0 each result equals what
    the prompt would give alone (the attention mask hides the padding).
    """
    params = params or GenParams()
    if batch_size < 1:
        raise LlamaftError(f"batch_size must be >= 1, got {batch_size}")
    rendered = [p if not p or isinstance(p[0], int) else chat_prompt_ids(p, tokenizer, rules) for p in prompts]
    if any(len(p) == 0 for p in rendered):
        raise LlamaftError("generate_batch: empty prompt")
    config = generation_config(params, rules)
    stop = set(rules.stop_ids)
    device = _device(model)
    # Similar lengths together: less padding to compute; order restored at the end.
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    results: list[GenResult | None] = [None] * len(rendered)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = _pad_left([rendered[i] for i in chunk], rules.pad_id, device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, i in enumerate(chunk):
            results[i] = _result(tokenizer, out[row, ids.shape[1]:].tolist(), stop)
    return results  # type: ignore[return-value]
