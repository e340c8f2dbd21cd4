"""Padding-free packing: pure functions over token lists.

Two jobs:
  * bins: which examples share a packed row (`pack_in_order`, `pack_first_fit_decreasing`);
  * `flatten` / `PackedCollator`: several examples -> ONE row `[1, T]` with no pad token at all.

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
"""

from __future__ import annotations

from typing import Sequence

import torch

from .chat import IGNORE_INDEX


def pack_in_order(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy in order: start a new bin when the next example does not fit. Keeps data order
    (so a run's example order, and its loss curve, is the same as without packing)."""
    bins: list[list[int]] = []
    used = max_tokens + 1
    for i, n in enumerate(lengths):
        if used + n > max_tokens:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n  # an example longer than max_tokens gets a bin of its own (never split)
    return bins


def pack_first_fit_decreasing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: longest first, each into the first bin with room. Fewer, fuller bins
    (typically > 95% full) at the cost of reordering; ties keep the original order (stable)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return bins


def flatten(examples: Sequence[dict]) -> dict:
    """Concatenate examples (dicts with `input_ids` and optional `labels`) into one packed row."""
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
    """Trainer data_collator: the micro-batch's examples become one padding-free row (see module doc).
    No attention_mask: its absence is what makes HF SDPA fall back to reading packed position_ids."""

    def __call__(self, batch: list[dict]) -> dict:
        return flatten(batch)


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding, for throughput accounting (packed rows have no padding)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())
