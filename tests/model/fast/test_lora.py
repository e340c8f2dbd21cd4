"""Fused LoRA linear (model/fast/lora.py): parity with the plain expression, and opaque to torch.compile."""

import torch

from llamaft.model.fast.lora import lora_linear


def _inputs(seed=0, n=6, k=8, out=5, r=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n // 2, k, generator=g, requires_grad=True)
    w = torch.randn(out, k, generator=g)
    a = torch.randn(r, k, generator=g, requires_grad=True)
    b = torch.randn(out, r, generator=g, requires_grad=True)
    return x, w, a, b


def test_lora_linear_matches_the_plain_expression_forward_and_backward():
    x, w, a, b = _inputs()
    y = lora_linear(x, w, a, b, 0.5)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    ref = x @ w.t() + 0.5 * (x @ a.t()) @ b.t()
    ref.square().sum().backward()
    assert torch.allclose(y, ref, atol=1e-5)
    for g, t in zip(got, (x, a, b)):
        assert torch.allclose(g, t.grad, atol=1e-4)


def test_frozen_input_gets_no_gradient_and_adapters_still_do():
    x, w, a, b = _inputs(1)
    x = x.detach()
    lora_linear(x, w, a, b, 2.0).sum().backward()
    assert x.grad is None and a.grad is not None and b.grad is not None
    xa = (x.reshape(-1, 8) @ a.t()).detach()
    assert torch.allclose(b.grad, (2.0 * xa.sum(0)).expand(5, 2), atol=1e-4)  # d(sum y)/dB = s * sum_n xa


def test_compiled_graph_keeps_the_op_whole():
    """Traced, an in-place addmm_ became an out-of-place addmm plus a copy of the base output; the
    custom op must reach the compiled graph as one node, with no addmm / copy of its own."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x, w, a, b = _inputs(2)
    f = torch.compile(lambda x, a, b: lora_linear(x, w, a, b, 0.5), backend=backend, fullgraph=True)
    y = f(x, a, b)
    assert torch.allclose(y, x @ w.t() + 0.5 * (x @ a.t()) @ b.t(), atol=1e-5)
    assert any("llamaft.lora_linear" in t for t in seen), seen
    assert not any("addmm" in t or "copy" in t for t in seen), seen
