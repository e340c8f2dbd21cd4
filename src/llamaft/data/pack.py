"""Padding-free packing: a micro-batch's examples -> ONE row `[1, T]`, no pad token between them.

`flatten` is a pure function over token lists; `PackedCollator` is the Trainer's data_collator the
fast path picks (model/fast: `make_collator`). The examples sharing a row are the micro-batch the
Trainer's sampler draws (its size set by the fast-path plan): no bin packing.

A packed row carries, besides `input_ids` / `labels`:
  * `position_ids` restarting at 0 for every example (RoPE sees each example as if alone);
  * `cu_seq_lens_q/k` (int32 cumulative lengths, [0, l0, l0+l1, ...]) and `max_length_q/k`:
    the keyword names transformers' flash / varlen attention path reads, so our varlen kernel
    (model/fast/attention.py) never attends across examples;
  * `labels` whose FIRST token of every example is -100: the causal-LM loss shifts labels by one,
    so the last token of example i would otherwise be trained to predict example i+1's first token.

Example: lengths 3 and 2 ->
    position_ids [[0, 1, 2, 0, 1]], cu_seq_lens_q [0, 3, 5], max_length_q 3,
    labels       [[-100, l1, l2, -100, m1]]

`multiple` (fast.pack_multiple, decided by the plan): a row of two or more examples is rounded up to
a multiple of that many tokens with ONE trailing pad segment, so a run meets a few distinct row
lengths, i.e. a few GEMM shapes that cuBLAS has already planned, instead of a new one per micro-batch.
The pad segment is the pad id (never EOS), labels all -100, positions 0..k-1 and its own cu_seq_lens
entry, so attention never mixes it with a real example and the loss never sees it. With multiple=4,
lengths 3 and 2 -> input_ids [[a, b, c, d, e, PAD, PAD, PAD]], cu_seq_lens_q [0, 3, 5, 8].
"""

from __future__ import annotations

from typing import Sequence

import torch

from .chat import IGNORE_INDEX


def flatten(examples: Sequence[dict], multiple: int = 0, pad_id: int | None = None) -> dict:
    """Concatenate examples (dicts with `input_ids` and optional `labels`) into one packed row; with
    `multiple` > 0, a row of two or more examples is padded up to a multiple of it (module doc). A row
    of ONE example is never padded: long single sequences keep their exact shape, which the plan's
    one-example path (fast.single_sequence_sdpa: causal SDPA / cuDNN on rows with one segment) needs."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    cu = [0]
    for ex in examples:
        # dict rows (HF style) or data.chat.Example dataclasses alike
        x = list(ex["input_ids"] if isinstance(ex, dict) else ex.input_ids)
        if not x:
            continue  # an empty example would make a zero-length segment; drop it
        y = ex.get("labels") if isinstance(ex, dict) else getattr(ex, "labels", None)
        y = x if y is None else list(y)
        if len(y) != len(x):
            raise ValueError(f"labels ({len(y)}) and input_ids ({len(x)}) differ in length")
        ids += x
        labels += [IGNORE_INDEX] + y[1:]
        pos += range(len(x))
        cu.append(cu[-1] + len(x))
    if not ids:
        raise ValueError("cannot pack an empty batch")
    pad = -len(ids) % multiple if multiple > 0 and len(cu) > 2 else 0
    if pad:
        if pad_id is None:
            raise ValueError("padding packed rows to a multiple needs the pad id")
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += range(pad)
        cu.append(cu[-1] + pad)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    max_len = int((cu_t[1:] - cu_t[:-1]).max())
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seq_lens_q": cu_t,
        "cu_seq_lens_k": cu_t.clone(),
        "max_length_q": max_len,
        "max_length_k": max_len,
    }


class PackedCollator:
    """Trainer data_collator: the micro-batch's examples become one packed row (see module doc), padded
    to a multiple of `multiple` tokens with `pad_id` when multiple > 0 and the row holds several examples.
    No attention_mask: its absence is what makes HF SDPA fall back to reading packed position_ids."""

    def __init__(self, multiple: int = 0, pad_id: int | None = None):
        if multiple > 0 and pad_id is None:
            raise ValueError("PackedCollator(multiple=...) needs pad_id")
        self.multiple, self.pad_id = multiple, pad_id

    def __call__(self, batch: list[dict]) -> dict:
        return flatten(batch, self.multiple, self.pad_id)
