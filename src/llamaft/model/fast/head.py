"""A frozen lm_head parked in pinned CPU memory outside the loss (fast.cpu_lm_head; auto: qlora).

With the fused loss (model/fast/loss.py) the lm_head's weight is read once per micro-batch, inside
the forward (the loss's gradients are computed there); the whole backward never touches it. On
QLoRA-8B that is 0.98 GiB of a ~7 GiB budget held idle through the backward, where the peak is.
Here the weight's storage moves to a pinned CPU copy right after the loss, and comes back on a side
stream while the forward is still running the last decoder layers (`prefetch`, a pre-hook on the
layer `_AHEAD` from the top), so the copy overlaps compute instead of delaying the loss.

The parameter object stays the same (state_dict, `named_parameters`, PEFT see it); only its `.data`
moves. Any call without labels (evaluation, generation) brings it back first (`acquire`), and
`restore` puts it back on the GPU for good (end of training).
"""

from __future__ import annotations

import torch

_AHEAD = 8  # decoder layers before the top whose forward hides the 1 GiB host-to-device copy


class ParkedWeight:
    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self.device = param.device
        self.cpu = param.detach().to("cpu").pin_memory()  # frozen: this copy stays valid
        self.stream = torch.cuda.Stream(self.device)
        self.pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    @property
    def parked(self) -> bool:
        return self.param.device.type == "cpu"

    @torch._dynamo.disable  # called from a layer's pre-hook: streams are not something to trace
    def prefetch(self) -> None:
        """Start the copy back (no-op when on the GPU or already coming)."""
        if not self.parked or self.pending is not None:
            return
        with torch.cuda.stream(self.stream):
            gpu = self.cpu.to(self.device, non_blocking=True)
            self.pending = (gpu, self.stream.record_event())

    def acquire(self) -> torch.nn.Parameter:
        """The parameter, on the GPU (waits for the prefetch, or copies now)."""
        if not self.parked:
            return self.param
        self.prefetch()
        gpu, done = self.pending
        self.pending = None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        gpu.record_stream(current)  # allocated on the side stream, used (and freed) on this one
        self.param.data = gpu
        return self.param

    def release(self) -> None:
        """Drop the GPU storage (kernels already queued on this stream still read it safely: the
        caching allocator reuses the block only for work ordered after them)."""
        self.param.data = self.cpu

    def restore(self) -> None:
        self.acquire()


def parkable(lm, layers) -> bool:
    """`lm.lm_head` may wait in CPU memory: a plain bias-free nn.Linear, frozen, on CUDA, not tied to
    the input embeddings, with decoder `layers` to start its copy back from."""
    head = getattr(lm, "lm_head", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return False
    if not head.weight.is_cuda or layers is None or len(layers) == 0:
        return False
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    return emb is None or getattr(emb, "weight", None) is not head.weight


def park_lm_head(lm, layers) -> ParkedWeight | None:
    """Park `lm.lm_head.weight` between losses; None when not `parkable`."""
    if not parkable(lm, layers):
        return None
    head = lm.lm_head
    parked = ParkedWeight(head.weight)
    layers[max(0, len(layers) - _AHEAD)].register_forward_pre_hook(lambda *_: parked.prefetch())
    return parked
