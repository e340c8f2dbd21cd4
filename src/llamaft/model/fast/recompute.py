"""Layer-level activation checkpointing, optionally with the saved layer inputs parked in CPU memory.

Why our own (HF's `gradient_checkpointing_enable` is the plain reference):
  * offload: a checkpointed 8B Llama keeps one [tokens, 4096] bf16 input per layer on the GPU
    (256 KiB per token over 32 layers: 0.8 GiB at W512's 3k-token micro-batch, 64 GiB at 262k
    tokens). With `offload=True` that input is copied to pinned CPU memory on a side stream while
    the layer runs, and copied back one layer ahead during the backward, so the copies overlap
    the compute instead of adding to it;
  * compile: the layer body can be a `torch.compile`d function while the checkpoint itself stays
    outside the graph (streams and CPU copies are not something to trace);
  * partial: a policy may leave a layer un-checkpointed for a given micro-batch (its token count
    decides how many layers must be recomputed to fit: model/fast/memory.py checkpoint_table);
  * long sequences: `tile_mlp` runs the MLP in token chunks, each recomputed on its own, so the
    [tokens, 14336] intermediates never exist for the whole sequence at once;
  * small cards: `defer_mlp` moves a recomputed layer's MLP into the backward, chunk by chunk, each
    chunk's backward right after its forward -- the same memory as tiles for no extra FLOPs: the
    recomputation never reads the MLP's output, only its graph, so its forward is not run there.

The checkpoint is the reentrant kind (forward under no_grad, backward = recompute + backward): its
inputs here are a hidden state and a constant dummy that requires grad, so the output always needs
a gradient even when the embeddings are frozen. The RNG state is replayed in the recompute (as
torch.utils.checkpoint does), so adapters with dropout get the same masks in both passes.
"""

from __future__ import annotations

from typing import Callable

import threading

import torch
import torch.utils.checkpoint as ckpt


class _State(threading.local):
    recomputing = False  # inside a _Checkpoint's recomputation (its backward re-running the layer)


_STATE = _State()


class _Chain:
    """Saved inputs of one forward pass, in layer order, so a backward can prefetch the layer below."""

    def __init__(self):
        self.last: _Saved | None = None


class _Saved:
    def __init__(self, prev: "_Saved | None"):
        self.prev = prev
        self.gpu: torch.Tensor | None = None   # on the GPU (not offloaded, or prefetched)
        self.cpu: torch.Tensor | None = None   # pinned copy
        self.ready: torch.cuda.Event | None = None
        self.device: torch.device | None = None

    def park(self, x: torch.Tensor, stream) -> None:
        self.device = x.device
        if stream is None:
            self.gpu = x
            return
        self.cpu = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            self.cpu.copy_(x, non_blocking=True)
        x.record_stream(stream)  # x's memory is not reused before the copy has read it
        self.ready = stream.record_event()

    def fetch(self, stream) -> None:
        """Start the copy back (on the side stream); no-op when already on the GPU."""
        if self.gpu is not None or self.cpu is None:
            return
        with torch.cuda.stream(stream):
            stream.wait_event(self.ready)
            self.gpu = self.cpu.to(self.device, non_blocking=True)
            self.ready = stream.record_event()
        self.cpu = None

    def take(self, stream) -> torch.Tensor:
        self.fetch(stream)
        x, self.gpu = self.gpu, None
        if stream is not None:
            torch.cuda.current_stream(x.device).wait_event(self.ready)
            x.record_stream(torch.cuda.current_stream(x.device))
        return x


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, _dummy, run, chain, stream):
        ctx.run, ctx.stream = run, stream
        ctx.autocast = [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cuda", "cpu")]
        ctx.saved = _Saved(chain.last)
        chain.last = ctx.saved
        ctx.device = hidden.device
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
        with torch.no_grad():
            out = run(hidden)
        ctx.saved.park(hidden.detach(), stream)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved
        x = saved.take(ctx.stream)
        if saved.prev is not None and ctx.stream is not None:
            saved.prev.fetch(ctx.stream)  # the layer below: its copy overlaps this layer's recompute
        saved.prev = None
        x = x.detach().requires_grad_(True)
        cuda = [ctx.device] if ctx.rng[1] is not None else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"), torch.enable_grad(), \
                torch.autocast("cuda", dtype=ctx.autocast[0][2], enabled=ctx.autocast[0][1]), \
                torch.autocast("cpu", dtype=ctx.autocast[1][2], enabled=ctx.autocast[1][1]):
            torch.set_rng_state(ctx.rng[0])
            if cuda:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            _STATE.recomputing = True
            try:
                out = ctx.run(x)
            finally:
                _STATE.recomputing = False
        torch.autograd.backward(out, grad)
        return x.grad, None, None, None, None


def install(layers, *, offload: bool, wrap_body: Callable[[Callable], Callable] | None = None,
            policy: Callable[[int, int], bool] | None = None) -> int:
    """Checkpoint every decoder layer (forward patched on the instance); `wrap_body` (e.g. compile)
    is applied to the layer body inside the checkpoint. All layers share one prefetch chain.
    `policy(layer_index, tokens)`: False runs that layer plainly for this micro-batch (its
    activations kept, no recompute); default: always checkpoint."""
    chain = _Chain()
    dummy = torch.zeros((), requires_grad=True)
    streams: dict = {}
    for index, layer in enumerate(layers):
        body = layer.forward
        if wrap_body is not None:
            body = wrap_body(body)
        layer.forward = _bind(body, offload, chain, dummy, streams, index, policy)
    return len(layers)


def _bind(fn, offload, chain, dummy, streams, index=0, policy=None):
    def forward(hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(hidden_states, *args, **kwargs)
        if policy is not None and not policy(index, hidden_states.shape[:-1].numel()):
            return fn(hidden_states, *args, **kwargs)
        stream = None
        if offload and hidden_states.is_cuda:
            dev = hidden_states.device
            if dev not in streams:
                streams[dev] = torch.cuda.Stream(dev)
            stream = streams[dev]
        # a KV cache would be filled by the forward and read again by the recompute (as HF's own
        # checkpointing, training runs without one)
        kwargs = without_kv_cache(kwargs)
        return _Checkpoint.apply(hidden_states, dummy, lambda h: fn(h, *args, **kwargs), chain, stream)

    return forward


# The decoder layer's name for its KV cache: transformers <= 5.2x `past_key_values`, newer `cache`
# (5.24 renamed it and keeps the old name as a deprecated alias until 5.40). Both are cleared;
# tests/test_library_contracts.py checks the installed LlamaDecoderLayer still takes one of them.
CACHE_KWARGS = ("cache", "past_key_values")


def without_kv_cache(kwargs: dict) -> dict:
    """The layer's keyword arguments with any KV cache dropped and caching off."""
    if not any(name in kwargs for name in CACHE_KWARGS):
        return kwargs
    return {**kwargs, **{name: None for name in CACHE_KWARGS if name in kwargs}, "use_cache": False}


def tile_mlp(mlp, rows: int) -> None:
    """Run `mlp` in chunks of `rows` tokens when the input is longer; with grad each chunk is its own
    (non-reentrant) checkpoint, so only one chunk's [rows, intermediate] tensors are alive at a time."""
    body = mlp.forward

    def forward(x):
        if x.shape[:-1].numel() <= rows:
            return body(x)
        flat = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():
            parts = [ckpt.checkpoint(body, c, use_reentrant=False) for c in flat.split(rows)]
        else:
            parts = [body(c) for c in flat.split(rows)]
        return torch.cat(parts).reshape(*x.shape[:-1], -1)

    mlp.forward = forward


class _DeferredMLP(torch.autograd.Function):
    """An MLP inside a checkpoint's recomputation: its output is only added to the residual, whose
    backward never reads it, so the forward returns zeros and the real work happens in the backward,
    `rows` tokens at a time: forward a chunk with grad, its backward at once, next chunk."""

    @staticmethod
    def forward(ctx, x, body, rows):
        ctx.body, ctx.rows = body, rows
        ctx.autocast = [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cuda", "cpu")]
        ctx.save_for_backward(x)
        return torch.zeros_like(x)  # never read (a Llama MLP maps hidden -> hidden)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat_x, flat_g = x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat_x)
        (_, cuda_on, cuda_dtype), (_, cpu_on, cpu_dtype) = ctx.autocast
        for start in range(0, flat_x.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            xc = flat_x[part].detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast("cuda", dtype=cuda_dtype, enabled=cuda_on), \
                    torch.autocast("cpu", dtype=cpu_dtype, enabled=cpu_on):
                yc = ctx.body(xc)
            torch.autograd.backward(yc, flat_g[part])
            dx[part] = xc.grad
        return dx.view_as(x), None, None


def defer_mlp(mlp, rows: int, wrap_body: Callable[[Callable], Callable] | None = None) -> None:
    """`mlp` (a hidden -> hidden MLP of a layer checkpointed by `install`) deferred and chunked in
    its layer's recomputation (_DeferredMLP); without grad (the checkpointed forward, evaluation) it
    runs in chunks of `rows` tokens too; with grad outside a recomputation (a layer the policy did
    not checkpoint) it runs whole. Only for parameters stepped after the backward: a chunked backward
    accumulates each weight's gradient once per chunk (an optimizer in the backward would step on
    each), and without dropout: a chunk's masks could not repeat the first forward's."""
    body = mlp.forward
    run = wrap_body(body) if wrap_body is not None else body

    @torch._dynamo.disable  # a compiled layer calls it as an opaque function; `run` is compiled on its own
    def forward(x):
        if torch.is_grad_enabled():
            return _DeferredMLP.apply(x, run, rows) if _STATE.recomputing else run(x)
        if x.shape[:-1].numel() <= rows:
            return run(x)
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([run(c) for c in flat.split(rows)]).reshape(*x.shape[:-1], -1)

    mlp.forward = forward
