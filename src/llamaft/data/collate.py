"""Batches for the plain (CPU / fallback) path: right padding with the tokenizer's pad id.

    batch = Collator(pad_id=128004)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, ...])

Padding never carries loss (labels -100) and is masked out of attention, so which id pads is only a
question of hygiene — but it is never EOS: a model that learned "EOS everywhere at the end" stops
generating too early. The GPU fast path has its own padding-free collator (`llamaft.model.fast`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .chat import IGNORE_INDEX


def _fields(item: Any) -> tuple[list[int], list[int]]:
    """Accept dicts (HF datasets rows) and `Example` dataclasses alike."""
    if isinstance(item, dict):
        ids, labels = item["input_ids"], item.get("labels")
    else:
        ids, labels = item.input_ids, getattr(item, "labels", None)
    ids = list(ids)
    labels = list(ids) if labels is None else list(labels)
    if len(labels) != len(ids):
        raise ValueError(f"labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
    return ids, labels


@dataclass
class Collator:
    """Right-pads a list of examples into `input_ids`, `attention_mask`, `labels` (long tensors)."""

    pad_id: int
    pad_to_multiple_of: int | None = None  # 8 helps tensor cores on GPU; CPU does not care

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        rows = [_fields(item) for item in items]
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(lab, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
