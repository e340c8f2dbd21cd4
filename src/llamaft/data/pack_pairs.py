"""Preference pairs packed: a micro-batch of pairs -> ONE padding-free row holding every chosen and
every rejected sequence (prompt + answer each), plus where each token sits in the padded layout.

    batch = PackedPairCollator()([{"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}, ...])

The row is data.pack.flatten's (position_ids restarting per sequence, cu_seq_lens_q/k, labels -100 on
every prompt token and on each sequence's first token), its sequences in the order chosen_0,
rejected_0, chosen_1, rejected_1, ...: each attends only to itself (model/fast/attention.py).

DPO's loss and metrics (TRL's DPOTrainer) read pairs in the padded layout of TRL's
DataCollatorForPreference: [2B, S] rows, every chosen sequence first, then every rejected one. The
layout fields say where each padded cell is in the packed row, so per-token values computed on the
row can be laid out that way (train/preference_fast.py):
  * pair_index      [2B, S] long: packed position of token c of padded row r (0 on padding);
  * pair_mask       [2B, S] long: 1 on real tokens (the padded batch's attention_mask);
  * completion_mask [2B, S] long: 1 on answer tokens (TRL's completion_mask).

Example: one pair, prompt [7, 8], chosen [9], rejected [10, 11] ->
    input_ids  [[7, 8, 9, 7, 8, 10, 11]]     labels [[-100, -100, 9, -100, -100, 10, 11]]
    pair_index [[0, 1, 2, 0], [3, 4, 5, 6]]  pair_mask [[1, 1, 1, 0], [1, 1, 1, 1]]
    completion_mask [[0, 0, 1, 0], [0, 0, 1, 1]]
"""

from __future__ import annotations

from typing import Sequence

import torch

from .chat import IGNORE_INDEX
from .pack import flatten

LAYOUT_KEYS = ("pair_index", "pair_mask", "completion_mask")


def _ids(example, name: str) -> list[int]:
    # HF dataset rows (dicts) or data.chat.PreferenceExample alike
    return list(example[name] if isinstance(example, dict) else getattr(example, name))


def pack_pairs(examples: Sequence) -> dict:
    """A micro-batch of pairs (prompt_ids / chosen_ids / rejected_ids) as one packed row + its layout."""
    if not examples:
        raise ValueError("cannot pack an empty batch")
    seqs, prompt_lens = [], []
    for ex in examples:
        prompt = _ids(ex, "prompt_ids")
        for name in ("chosen_ids", "rejected_ids"):
            answer = _ids(ex, name)
            if not answer:
                raise ValueError(f"empty {name}: every pair needs two non-empty answers")
            seqs.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
        prompt_lens.append(len(prompt))
    row = flatten(seqs)
    cu = row["cu_seq_lens_q"].long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    n = len(examples)
    order = torch.cat([torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)])  # padded row r -> packed sequence
    cols = torch.arange(int(lengths.max()))[None, :]
    real = cols < lengths[order][:, None]
    prompt = torch.tensor(prompt_lens * 2)[:, None]
    return {
        **row,
        "pair_index": (starts[order][:, None] + cols) * real,
        "pair_mask": real.long(),
        "completion_mask": (real & (cols >= prompt)).long(),
    }


class PackedPairCollator:
    """Trainer data_collator for DPO with fast.preference_packing: see the module doc. No attention_mask
    on the packed row (our attention kernels take the boundaries from cu_seq_lens_q)."""

    def __call__(self, batch: list) -> dict:
        return pack_pairs(batch)
