"""data.pack: packed rows, boundaries, exact tensors."""

import pytest
import torch

from llamaft.data.pack import PackedCollator, flatten


def test_flatten_exact_tensors():
    b = flatten([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}, {"input_ids": [4]}])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    # first label of every example is -100: no loss from one example's end into the next one's start
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["cu_seq_lens_k"].tolist() == [0, 3, 5, 6]
    assert b["max_length_q"] == b["max_length_k"] == 3
    assert "attention_mask" not in b and b["input_ids"].numel() == 6  # every token real: no padding


def test_flatten_keeps_masked_prompt_labels_and_skips_empty():
    b = flatten([{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": []}])
    assert b["labels"].tolist() == [[-100, -100, 3, 4]] and b["cu_seq_lens_q"].tolist() == [0, 4]


def test_flatten_errors():
    with pytest.raises(ValueError):
        flatten([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError):
        flatten([{"input_ids": []}])


def test_collator_is_flatten():
    rows = [{"input_ids": [1, 2]}, {"input_ids": [3]}]
    assert PackedCollator()(rows)["position_ids"].tolist() == [[0, 1, 0]]


def test_flatten_accepts_example_objects():
    from types import SimpleNamespace

    b = flatten([SimpleNamespace(input_ids=[1, 2, 3], labels=[-100, 2, 3]), {"input_ids": [4, 5]}])
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5]]


def test_flatten_pads_to_a_multiple_with_one_trailing_pad_segment():
    b = flatten([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}], multiple=8, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]  # the pad is never trained
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == [0, 3, 5, 8]  # its own segment
    assert b["max_length_q"] == b["max_length_k"] == 3
    plain = flatten([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}])
    for key in ("input_ids", "labels", "position_ids"):  # only the pad tokens are extra
        assert b[key][:, :5].tolist() == plain[key].tolist()
    assert flatten([{"input_ids": [1] * 3}, {"input_ids": [2] * 9}], 4, 0)["max_length_q"] == 9


def test_flatten_multiple_leaves_exact_multiples_and_single_examples_alone():
    b = flatten([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8]}], multiple=8, pad_id=0)
    assert b["input_ids"].numel() == 8 and b["cu_seq_lens_q"].tolist() == [0, 3, 8]
    one = flatten([{"input_ids": list(range(1, 12))}, {"input_ids": []}], multiple=8, pad_id=0)
    assert one["input_ids"].numel() == 11 and one["cu_seq_lens_q"].tolist() == [0, 11]  # one example: as today
    rows = [{"input_ids": [1, 2]}, {"input_ids": [3]}]
    assert PackedCollator(16, pad_id=99)(rows)["input_ids"].tolist() == [[1, 2, 3] + [99] * 13]
    with pytest.raises(ValueError):
        PackedCollator(16)
