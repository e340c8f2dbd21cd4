"""Optimizer in backward: each parameter is updated the moment its gradient is complete, then that
gradient is freed, so a full fine-tune never holds the whole gradient (15 GiB for an 8B model in
bf16: the difference between fitting a 48 GB card with 8-bit AdamW and not).

    opt = in_backward_optimizer(model, training_args)      # refuses what cannot work (below)
    trainer = Trainer(model, training_args, optimizers=(opt, None), ...)  # HF builds the LR scheduler on it

One inner optimizer per trainable parameter (torch AdamW, or bitsandbytes' AdamW with 8-bit states),
stepped by a post-accumulate-grad hook on that parameter. The wrapper's `param_groups` are the
inner optimizers' own group dicts, so the LR scheduler HF builds on the wrapper writes each lr
straight into them; `step()` and `zero_grad()` have nothing left to do. The same idea as torchtune's
`optimizer_in_backward`, with the same limits:

- no gradient accumulation: a parameter steps on the first micro-batch's gradient alone;
- no global gradient-norm clipping: the norm is known only after every parameter has stepped;
- one process: under DDP each process would step on its own gradients before they were averaged;
- no fp16 grad scaler: it unscales and checks the gradients only after the whole backward.

NaN/Inf safety: the hooks add up the gradients' squared norms on the device (no host sync per
parameter), so the non-finite guard (nonfinite.py) can still read this step's gradient norm, and
`begin_backward(skip_updates=True)` makes the next backward only drop its gradients. The Trainer
(checkpoint.py) checks the loss before each backward and skips a NaN/Inf loss's update; a NaN
gradient under a finite loss is seen only after its update was applied, and the guard stops there.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# HF's optimizer names (train/setup.py resolves the user's to one of these)
TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused")
BNB_ADAMW_8BIT = ("adamw_bnb_8bit", "paged_adamw_8bit")
SUPPORTED = TORCH_ADAMW + BNB_ADAMW_8BIT


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: HF's own rule (no bias, no norm weights), so
    this optimizer groups exactly as Trainer.create_optimizer would. The method reads nothing from
    the Trainer instance (tests/test_library_contracts.py holds it to that)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def embedding_weights(model: nn.Module) -> set[int]:
    """ids of nn.Embedding weights: HF keeps their 8-bit AdamW states in 32 bits (8-bit states of
    embedding rows are known to destabilise training); we do the same."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _inner_optimizer(optim: str, param: nn.Parameter, *, lr: float, betas: tuple, eps: float, weight_decay: float,
                     embedding: bool) -> torch.optim.Optimizer:
    """The optimizer that updates one parameter, as HF's `optim` would build it for a whole model."""
    groups = [{"params": [param], "weight_decay": weight_decay}]
    if optim in TORCH_ADAMW:
        # fused only on CUDA: the CPU has no use for it and the per-tensor path is the reference
        fused = {"fused": True} if optim == "adamw_torch_fused" and param.is_cuda else {}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fused)
    # Lazily: bitsandbytes exists only where 8-bit optimizers can run (CUDA). Paged states live outside
    # torch's allocator and are evicted to host memory under pressure; the point of stepping in the
    # backward is a memory cap that holds, so paged_adamw_8bit runs with ordinary device states.
    import bitsandbytes as bnb

    return bnb.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, optim_bits=32 if embedding else 8, is_paged=False)


class InBackwardOptimizer(torch.optim.Optimizer):
    """Steps each trainable parameter of `model` inside the backward (see the module docstring).

    optim: one of SUPPORTED (HF's names); lr, betas, eps: AdamW's; weight_decay: for every parameter
    but biases and norms (HF's grouping). `skip_updates`: when True the hooks only drop gradients.
    """

    def __init__(self, model: nn.Module, optim: str = "adamw_torch", *, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if optim not in SUPPORTED:
            raise ValueError(f"optimizer in backward supports {', '.join(SUPPORTED)}; got {optim!r}")
        decay, embeddings = decay_parameter_names(model), embedding_weights(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("optimizer in backward: the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.inner = [
            _inner_optimizer(optim, p, lr=lr, betas=tuple(betas), eps=eps,
                             weight_decay=weight_decay if n in decay else 0.0, embedding=id(p) in embeddings)
            for n, p in named
        ]
        self._by_param = {p: opt for (_, p), opt in zip(named, self.inner)}
        # The inner optimizers' own group dicts (Optimizer.__init__ keeps the dicts it is given): the
        # LR scheduler HF builds on this wrapper writes group["lr"] where the inner steps read it.
        super().__init__([opt.param_groups[0] for opt in self.inner], {"lr": lr})
        self.skip_updates = False
        self._sum_sq: torch.Tensor | None = None  # this backward's squared gradient norm, on the device
        self._updated = 0                         # parameters updated since begin_backward
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in named]

    # -- the work, inside the backward ------------------------------------------------------------

    def _on_grad(self, param: torch.Tensor) -> None:
        """The gradient of `param` is complete: measure it, update with it (unless skipping), free it."""
        grad = param.grad
        if grad is None:
            return
        sq = torch.linalg.vector_norm(grad.detach()).float().square()
        if self._sum_sq is None:
            self._sum_sq = sq
        else:
            self._sum_sq = self._sum_sq + sq.to(self._sum_sq.device)
        if not self.skip_updates:
            self._by_param[param].step()
            self._updated += 1
        param.grad = None  # the memory point: no gradient outlives its own update

    def begin_backward(self, skip_updates: bool = False) -> None:
        """Before each backward: start a new gradient-norm measurement; skip_updates=True makes this
        backward only drop its gradients (a NaN/Inf loss must never reach the weights)."""
        self.skip_updates = skip_updates
        self._sum_sq = None
        self._updated = 0

    def grad_norm(self) -> torch.Tensor | None:
        """L2 norm of the gradients seen since begin_backward (a device tensor; None: none seen)."""
        return None if self._sum_sq is None else self._sum_sq.sqrt()

    @property
    def updates_applied(self) -> bool:
        """Did any parameter step since begin_backward? (Then a bad gradient is in the weights already.)"""
        return self._updated > 0

    def remove_hooks(self) -> None:
        """Detach from the model: its later backwards leave gradients in .grad again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- what the Trainer calls -------------------------------------------------------------------

    def step(self, closure: Callable | None = None):
        """Nothing left to do: every parameter stepped in the backward. A closure still runs (its
        backward is the step)."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks free every gradient after its update."""

    @property
    def state(self) -> dict:
        """The inner optimizers' states by parameter (a read-only view)."""
        return {p: opt.state[p] for p, opt in self._by_param.items() if p in opt.state}

    @state.setter
    def state(self, value) -> None:
        # Optimizer.__init__ assigns an empty state; the real states live in the inner optimizers.
        if value:
            raise AttributeError("InBackwardOptimizer.state is a view of its inner optimizers' states")

    def state_dict(self) -> dict:
        """A torch optimizer state dict with one group per parameter (group i holds param i, named):
        plain tensors, numbers and strings, so HF's torch.save / torch.load(weights_only=True) of
        optimizer.pt round-trips it, and accelerate can move it between devices."""
        state, groups = {}, []
        for i, (name, opt) in enumerate(zip(self.names, self.inner)):
            sd = opt.state_dict()
            if 0 in sd["state"]:
                state[i] = sd["state"][0]
            (group,) = sd["param_groups"]
            groups.append({**group, "params": [i], "param_names": [name]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what state_dict() wrote, parameter by parameter; the group dicts stay the ones the LR
        scheduler writes to (torch's load_state_dict would replace them)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.inner):
            raise ValueError(f"the optimizer state holds {len(groups)} parameters; this model trains {len(self.inner)}")
        for group, name in zip(groups, self.names):
            saved = group.get("param_names", [name])[0]
            if saved != name:
                raise ValueError(f"the optimizer state does not match this model: {saved} where {name} is")
        for i, (opt, group) in enumerate(zip(self.inner, groups)):
            live = opt.param_groups[0]
            saved = {k: v for k, v in group.items() if k != "param_names"}
            state = {0: state_dict["state"][i]} if i in state_dict["state"] else {}
            opt.load_state_dict({"state": state, "param_groups": [{**saved, "params": [0]}]})
            live.update({k: v for k, v in opt.param_groups[0].items() if k != "params"})
            opt.param_groups[0] = live


def in_backward_of(optimizer) -> InBackwardOptimizer | None:
    """The InBackwardOptimizer behind `optimizer` (accelerate wraps it: AcceleratedOptimizer.optimizer)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, InBackwardOptimizer) else None


def in_backward_optimizer(model: nn.Module, args) -> InBackwardOptimizer:
    """The InBackwardOptimizer for `model` from HF TrainingArguments (optim, learning_rate, adam_*,
    weight_decay); ValueError with a one-line reason for a run it cannot serve."""
    check_run(args)
    optim = getattr(args.optim, "value", args.optim)  # OptimizerNames is a str enum; dict/tuple lookups want the str
    return InBackwardOptimizer(model, optim, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                               eps=args.adam_epsilon, weight_decay=args.weight_decay)


def check_run(args) -> None:
    """Refuse what stepping inside the backward cannot do (see the module docstring for why)."""
    if args.gradient_accumulation_steps > 1:
        raise ValueError("optimizer in backward updates each parameter on one micro-batch's gradient: set "
                         f"train.gradient_accumulation=1 (got {args.gradient_accumulation_steps})")
    if args.world_size > 1:
        raise ValueError("optimizer in backward runs in one process: under DDP each process would step on its own "
                         f"gradients before they were averaged (world size {args.world_size})")
    if args.n_gpu > 1:
        raise ValueError(f"optimizer in backward runs on one GPU, and HF would spread this process over {args.n_gpu} "
                         "with DataParallel: make one visible (CUDA_VISIBLE_DEVICES=0)")
    if args.fp16:
        raise ValueError("optimizer in backward cannot run under fp16: its grad scaler unscales and checks the "
                         "gradients only after the whole backward; use train.precision=bf16")
    if args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError("optimizer in backward cannot clip gradients (their global norm is known only after "
                         f"every parameter stepped): set train.max_grad_norm=0 (got {args.max_grad_norm})")
