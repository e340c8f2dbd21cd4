from dataclasses import dataclass

import pytest
import torch

from llamaft.data.collate import Collator


@dataclass
class _Ex:  # same shape as llamaft.data.chat.Example
    input_ids: list
    labels: list
    where: str = "t"


def test_right_pads_with_pad_id_and_masks_labels():
    batch = Collator(pad_id=7)([
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4], "labels": [4]},
    ])
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [4, 7, 7]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 2, 3], [4, -100, -100]]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_accepts_examples_and_pad_multiple():
    batch = Collator(pad_id=0, pad_to_multiple_of=4)([_Ex([5, 6], [-100, 6]), _Ex([9, 9, 9], [9, 9, 9])])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 0, 0], [9, 9, 9, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, -100, -100], [9, 9, 9, -100]]))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        Collator(pad_id=0)([{"input_ids": [1, 2], "labels": [1]}])
