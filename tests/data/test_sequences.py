"""Samples -> SequenceBatch: KJT shapes, targets, chunk-aligned truncation, multi-target evaluation."""

import numpy as np
import torch

from ksa_rec.data.etl import InteractionData
from ksa_rec.data.sequences import Collator, EpochSampler, EvalWindows, TrainWindows
from ksa_rec.data.split import EvalTargets, tail_split
from ksa_rec.data.vocab import Vocab


def _data(lengths):
    n = sum(lengths)
    items = np.arange(n, dtype=np.int64) % 17 + 2
    data = InteractionData(
        users=Vocab([f"u{i}" for i in range(len(lengths))]), items=Vocab([f"i{i}" for i in range(17)]),
        features={"cat": Vocab(["a", "b", "c"])},
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), item_ids=items,
        timestamps=np.arange(n, dtype=np.int64) * 10, feature_ids={"cat": items % 3 + 2},
        labels={"evidence_distance": np.arange(n, dtype=np.int64)})
    data.validate()
    return data


def test_training_batch_is_a_kjt_with_shifted_targets_and_whole_chunks():
    data = _data([11, 3, 1])
    windows = TrainWindows(np.array([11, 3, 1]), max_len=8, chunk_size=4)
    assert len(windows) == 2  # the 1-event user has no target
    samples = [windows[(i, 0)] for i in range(len(windows))]
    # user 0: inputs [0, 10) cut to <= 8 events at a chunk boundary -> [4, 10); user 1: inputs [0, 2)
    assert samples == [(0, 4, 11), (1, 0, 3)]
    batch = Collator(data, time_gap_buckets=8, train=True)(samples)
    kjt = batch.features
    assert kjt.keys() == ["item_id", "cat", "time_gap"]
    assert kjt.lengths().tolist() == [6, 2] * 3
    assert kjt["item_id"].values().tolist() == data.item_ids[[4, 5, 6, 7, 8, 9, 11, 12]].tolist()
    assert batch.targets.tolist() == data.item_ids[[5, 6, 7, 8, 9, 10, 12, 13]].tolist()
    assert batch.positions.tolist() == [4, 5, 6, 7, 8, 9, 0, 1]
    assert batch.offsets.tolist() == [0, 6, 8] and batch.max_len == 6
    # time gaps: 10 s everywhere except each user's first event (bucket 0)
    assert kjt["time_gap"].values().tolist() == [4, 4, 4, 4, 4, 4, 0, 4]


def test_epoch_sampler_reshuffles_and_random_windows_move():
    sampler = EpochSampler(5, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for i, _ in first) == list(range(5)) and [i for i, _ in first] != [i for i, _ in second]
    assert {e for _, e in second} == {1}
    windows = TrainWindows(np.array([400]), max_len=16, chunk_size=4, window="random")
    ends = {windows[(0, epoch)][2] for epoch in range(20)}
    assert len(ends) > 5 and all(17 <= e <= 400 for e in ends)
    assert all(windows[(0, epoch)][1] % 4 == 0 for epoch in range(20))


def test_leave_one_out_eval_batch():
    data = _data([6, 4])
    windows = EvalWindows(EvalTargets(np.array([0, 1]), np.array([5, 3])), max_len=8, chunk_size=2)
    batch = Collator(data, 0, train=False, labels=("evidence_distance",))([windows[0], windows[1]])
    assert batch.features.lengths().tolist() == [5, 3] * 2  # keys item_id, cat
    assert batch.eval_rows.tolist() == [4, 7]  # each user's last event
    assert batch.eval_targets.tolist() == [data.item_ids[5], data.item_ids[6 + 3]]
    assert batch.seen_offsets.tolist() == [0, 5, 8]
    assert batch.seen_values.tolist() == data.item_ids[[0, 1, 2, 3, 4, 6, 7, 8]].tolist()
    assert batch.labels["evidence_distance"].tolist() == [5, 9]


def test_tail_targets_share_one_pass_per_user():
    data = _data([10, 4])
    windows = EvalWindows(tail_split(data, tail=2).test, max_len=8, chunk_size=2)
    assert len(windows) == 1  # the 4-event user is too short for tail 2
    user, start, end, targets = windows[0]
    assert (user, start, end, targets.tolist()) == (0, 2, 9, [8, 9])
    batch = Collator(data, 0, train=False)([windows[0]])
    assert batch.features.lengths().tolist() == [7, 7]  # events [2, 9), keys item_id and cat
    assert batch.eval_rows.tolist() == [5, 6]  # states after events 7 and 8
    assert batch.eval_targets.tolist() == data.item_ids[[8, 9]].tolist()
    assert batch.seen_offsets.tolist() == [0, 8, 17]  # target 8 excludes items [0, 8); target 9 [0, 9)
    assert torch.equal(batch.seen_values[8:], torch.from_numpy(data.item_ids[:9]))
