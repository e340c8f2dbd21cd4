"""data.pack_pairs: preference pairs as one packed row + the padded layout, exact tensors."""

import pytest
import torch

from llamaft.data.chat import PreferenceExample
from llamaft.data.pack_pairs import PackedPairCollator, pack_pairs


def test_the_docstring_example_exactly():
    b = pack_pairs([{"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}])
    assert b["input_ids"].tolist() == [[7, 8, 9, 7, 8, 10, 11]]
    assert b["labels"].tolist() == [[-100, -100, 9, -100, -100, 10, 11]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 7] and b["max_length_q"] == 4
    assert b["pair_index"].tolist() == [[0, 1, 2, 0], [3, 4, 5, 6]]
    assert b["pair_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert "attention_mask" not in b  # no padding anywhere in the row


def test_layout_is_trls_padded_batch():
    """Gathered through pair_index, the row gives back TRL's DataCollatorForPreference batch: every
    chosen sequence, then every rejected one, same masks."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
            {"prompt_ids": [11], "chosen_ids": [12, 13, 14], "rejected_ids": [15, 16, 17, 18, 19]}]
    b, want = pack_pairs(rows), DataCollatorForPreference(pad_token_id=0)(rows)
    ids = b["input_ids"][0][b["pair_index"]].masked_fill(b["pair_mask"] == 0, 0)
    assert torch.equal(ids, want["input_ids"])
    assert torch.equal(b["pair_mask"], want["attention_mask"]) and torch.equal(b["completion_mask"], want["completion_mask"])
    # order in the row: chosen_0, rejected_0, chosen_1, rejected_1
    assert b["cu_seq_lens_q"].tolist() == [0, 5, 9, 13, 19]


def test_example_objects_and_errors():
    ex = PreferenceExample([1, 2], [3], [4, 5], "f:1")
    assert PackedPairCollator()([ex])["input_ids"].tolist() == [[1, 2, 3, 1, 2, 4, 5]]
    with pytest.raises(ValueError, match="empty rejected_ids"):
        pack_pairs([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []}])
    with pytest.raises(ValueError, match="empty batch"):
        pack_pairs([])
