"""Leave-one-out and temporal splits on hand-computed examples, including users with 1-2 events."""

from __future__ import annotations

import numpy as np
import pytest

from ksa_rec.data.etl import InteractionData
from ksa_rec.data.split import leave_one_out, temporal_cutoffs, temporal_split
from ksa_rec.data.vocab import Vocab


def make_data(timestamps_per_user: list[list[int]]) -> InteractionData:
    lengths = [len(t) for t in timestamps_per_user]
    n = sum(lengths)
    data = InteractionData(
        users=Vocab([f"u{i}" for i in range(len(lengths))]), items=Vocab(["a"]), features={},
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        item_ids=np.full(n, 2, dtype=np.int64),
        timestamps=np.array([t for ts in timestamps_per_user for t in ts], dtype=np.int64),
        feature_ids={}, labels={})
    data.validate()
    return data


def test_leave_one_out_hand_example():
    # lengths 5, 2, 1, 3, 0 (an empty user is legal in the layout and is never evaluated)
    data = make_data([[1, 2, 3, 4, 5], [1, 2], [7], [3, 3, 3], []])
    splits = leave_one_out(data)
    np.testing.assert_array_equal(splits.train_len, [3, 2, 1, 1, 0])
    np.testing.assert_array_equal(splits.valid.user, [0, 3])
    np.testing.assert_array_equal(splits.valid.position, [3, 1])
    np.testing.assert_array_equal(splits.test.user, [0, 3])
    np.testing.assert_array_equal(splits.test.position, [4, 2])
    assert len(splits.test) == 2
    for arr in (splits.train_len, splits.valid.user, splits.valid.position, splits.test.position):
        assert arr.dtype == np.int64


def test_temporal_split_hand_example():
    data = make_data([
        [1, 5, 10, 12, 20, 25],  # train [1, 5]; valid target 10 (pos 2); test target 20 (pos 4)
        [1, 2],                  # all training; no event after 10 -> not evaluated
        [15, 30],                # no history before 10: valid target at pos 0 left out; test pos 1
        [3, 21],                 # train [3]; nothing in [10, 20) -> no valid; test 21 at pos 1
        [22],                    # only a test-period event at pos 0: no history, left out
        [10, 11],                # no training events; valid target at pos 0 left out; no test
    ])
    splits = temporal_split(data, valid_start=10, test_start=20)
    np.testing.assert_array_equal(splits.train_len, [2, 2, 0, 1, 0, 0])
    np.testing.assert_array_equal(splits.valid.user, [0])
    np.testing.assert_array_equal(splits.valid.position, [2])
    np.testing.assert_array_equal(splits.test.user, [0, 2, 3])
    np.testing.assert_array_equal(splits.test.position, [4, 1, 1])


def test_temporal_split_with_equal_cutoffs_has_no_validation():
    data = make_data([[1, 2, 3]])
    splits = temporal_split(data, valid_start=2, test_start=2)
    assert len(splits.valid) == 0
    np.testing.assert_array_equal(splits.test.position, [1])
    with pytest.raises(ValueError, match="must not be after"):
        temporal_split(data, valid_start=3, test_start=2)


def test_temporal_cutoffs_are_global_quantiles():
    data = make_data([list(range(0, 100, 2)), list(range(1, 100, 2))])  # timestamps 0..99
    valid_start, test_start = temporal_cutoffs(data, valid_fraction=0.1, test_fraction=0.2)
    assert (valid_start, test_start) == (70, 80)
    assert (data.timestamps >= test_start).mean() == pytest.approx(0.2)
    assert ((data.timestamps >= valid_start) & (data.timestamps < test_start)).mean() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="sum < 1"):
        temporal_cutoffs(data, valid_fraction=0.5, test_fraction=0.5)


def test_tail_split_many_targets_per_user():
    from ksa_rec.data.split import tail_split

    data = make_data([list(range(n)) for n in (10, 5, 6)])  # tail 2: needs n >= 6
    splits = tail_split(data, tail=2)
    assert splits.train_len.tolist() == [6, 5, 2]
    assert splits.valid.user.tolist() == [0, 0, 2, 2] and splits.valid.position.tolist() == [6, 7, 2, 3]
    assert splits.test.user.tolist() == [0, 0, 2, 2] and splits.test.position.tolist() == [8, 9, 4, 5]
