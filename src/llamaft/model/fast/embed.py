"""Frozen input embeddings kept in CPU memory (fast.cpu_embeddings; auto: on for qlora).

QLoRA on Llama-3.1-8B spends ~1 GiB of its ~7 GiB on the bf16 input embedding table
(128,256 x 4096), a table that is only ever read row by row and never trained. Here the rows a batch
needs are gathered on the CPU into pinned memory and copied to the GPU: tokens x 8 KiB per
micro-batch (40 MiB at W512's 16 sequences) instead of 1 GiB resident.

The weight stops being a registered parameter (so `model.device` and HF's device logic keep seeing
the GPU layers) but stays reachable as `embedding.weight`. Not used when the table is trained (added
tokens), tied to the lm_head (which needs it on the GPU), or not a plain nn.Embedding.
"""

from __future__ import annotations

import torch


def eligible(model) -> bool:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(emb) is not torch.nn.Embedding or emb.weight.requires_grad:
        return False
    return head is None or head.weight is not emb.weight


def embeddings_to_cpu(model) -> bool:
    """Move the input embedding table to CPU memory, gathering rows per batch; False = not eligible."""
    if not eligible(model):
        return False
    emb = model.get_input_embeddings()
    weight = emb.weight.detach().to("cpu")
    del emb._parameters["weight"]
    emb.weight = weight  # a plain attribute now: not in parameters(), state_dict() or .to(...)
    # padding_idx only shapes nn.Embedding's gradient; this table is frozen, so a plain lookup is exact
    emb.forward = lambda ids, _emb=emb: gather(_emb.weight, ids)
    return True


def gather(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """weight[ids] computed on the CPU and delivered on ids' device (same values as nn.Embedding)."""
    flat = ids.reshape(-1).to("cpu")
    cuda = ids.is_cuda
    out = torch.empty((flat.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=cuda)
    torch.index_select(weight, 0, flat, out=out)
    return out.to(ids.device, non_blocking=True).reshape(*ids.shape, weight.shape[1])
