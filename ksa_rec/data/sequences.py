"""Samples over the processed data and their collation into ``SequenceBatch``.

A sample is a slice of one user's history, stored as three ints so datasets stay tiny:

- training: ``(user, start, end)``: inputs are events ``[start, end-1)``, targets ``[start+1, end)``;
- evaluation: ``(user, start, end)``: inputs ``[start, end)``, the target is event ``end``, and every item
  of ``[0, end)`` is excluded from the ranking.

``start`` is always a multiple of ``chunk_size`` (KSA.md section 6): training sees the same chunks that
a streaming state builds from the user's first event.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.etl import InteractionData
from ksa_rec.data.schema import time_gap_bucket
from ksa_rec.data.split import EvalTargets
from ksa_rec.data.truncation import chunk_aligned_start


class TrainWindows(Dataset):
    """One training slice per user with at least two training events.

    ``window="last"`` takes the newest ``max_len`` inputs of the training prefix; ``"random"`` draws the
    slice's end uniformly per (epoch, user), so long histories are seen whole over epochs. Items are
    addressed by ``(index, epoch)`` keys, which :class:`EpochSampler` yields: the draw then depends on
    the epoch even inside persistent worker processes.
    """

    def __init__(self, train_len: np.ndarray, max_len: int, chunk_size: int, window: str = "last",
                 seed: int = 0):
        if window not in ("last", "random"):
            raise ValueError(f"train window must be 'last' or 'random', got {window!r}")
        self.users = np.flatnonzero(train_len >= 2)
        self.train_len = train_len[self.users]
        self.max_len, self.chunk_size, self.window, self.seed = max_len, chunk_size, window, seed

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, int]:
        i, epoch = key
        end = int(self.train_len[i])
        if self.window == "random" and end > self.max_len + 1:
            low = self.max_len + 1
            end = int(np.random.default_rng((self.seed, epoch, i)).integers(low, end + 1))
        start = int(chunk_aligned_start(end - 1, self.max_len, self.chunk_size))
        return int(self.users[i]), start, end


class EpochSampler(Sampler):
    """Shuffles ``range(n)`` anew each epoch (seeded) and yields ``(index, epoch)`` keys.

    Lightning calls ``set_epoch`` on the sampler before every training epoch.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n) if self.shuffle else range(self.n)
        return iter([(int(i), self.epoch) for i in order])


class EvalWindows(Dataset):
    """Evaluation samples: one per user, holding every target of that user.

    A sample ``(user, start, end, targets)`` runs one causal pass over events ``[start, end)`` with
    ``end`` = the user's last target; target ``p`` is ranked from the state after event ``p - 1``, so
    it sees history ``[start, p)`` (``start`` is chunk-aligned for ``end``: with several targets per
    user the earlier ones see up to ``end - p`` fewer old events than a pass of their own would give).
    Leave-one-out has one target per user: exactly the classic protocol.
    """

    def __init__(self, targets: EvalTargets, max_len: int, chunk_size: int):
        order = np.lexsort((targets.position, targets.user))
        user, position = targets.user[order], targets.position[order]
        bounds = np.flatnonzero(np.diff(user, prepend=-1, append=-1)) if len(user) else np.zeros(1, np.int64)
        self.user = user[bounds[:-1]]
        self.targets = np.split(position, bounds[1:-1]) if len(user) else []
        self.end = np.array([t[-1] for t in self.targets], dtype=np.int64)
        self.start = chunk_aligned_start(self.end, max_len, chunk_size)
        starts = np.repeat(self.start, [len(t) for t in self.targets])
        if len(user) and bool((np.concatenate(self.targets) <= starts).any()):
            raise ValueError("some targets are older than max_len allows for one pass per user; raise max_len")

    def __len__(self) -> int:
        return len(self.user)

    def __getitem__(self, i: int) -> tuple[int, int, int, np.ndarray]:
        return int(self.user[i]), int(self.start[i]), int(self.end[i]), self.targets[i]


class Collator:
    """Gathers samples into a ``SequenceBatch`` (numpy index arithmetic, no per-event Python loops)."""

    def __init__(self, data: InteractionData, time_gap_buckets: int, train: bool, labels: tuple[str, ...] = (),
                 predict: bool = False):
        """``predict``: evaluation samples whose single "target" is one past the last event (scoring:
        the state after the last event is the user vector; no target item exists)."""
        self.data, self.train, self.labels, self.predict = data, train, labels, predict
        self.gap_bucket = None
        if time_gap_buckets:
            self.gap_bucket = time_gap_bucket(torch.from_numpy(event_gaps(data)), time_gap_buckets).numpy()

    def __call__(self, samples: list[tuple]) -> SequenceBatch:
        user, start, end = (np.asarray(col, dtype=np.int64) for col in list(zip(*samples))[:3])
        base = self.data.offsets[user]
        input_end = end - 1 if self.train else end
        lengths = input_end - start
        rows = _ranges(base + start, lengths)
        batch = SequenceBatch.of_events(
            lengths, rows - np.repeat(base, lengths), user, self.data.item_ids[rows],
            {name: ids[rows] for name, ids in self.data.feature_ids.items()},
            None if self.gap_bucket is None else self.gap_bucket[rows])
        if self.train:
            batch.targets = torch.from_numpy(self.data.item_ids[rows + 1])
        else:
            self._add_targets(batch, samples, base, start, batch.offsets.numpy())
        return batch

    def _add_targets(self, batch: SequenceBatch, samples, base: np.ndarray, start: np.ndarray,
                     offsets: np.ndarray) -> None:
        """Eval rows (the event whose state ranks each target), targets, per-target seen items, labels."""
        counts = np.array([len(s[3]) for s in samples], dtype=np.int64)
        position = np.concatenate([s[3] for s in samples]).astype(np.int64)
        base_t, start_t = np.repeat(base, counts), np.repeat(start, counts)
        target_rows = base_t + position
        batch.eval_rows = torch.from_numpy(np.repeat(offsets[:-1], counts) + position - 1 - start_t)
        batch.seen_values = torch.from_numpy(self.data.item_ids[_ranges(base_t, position)])
        batch.seen_offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(position)]))
        if self.predict:
            return
        batch.eval_targets = torch.from_numpy(self.data.item_ids[target_rows])
        batch.labels = {name: torch.from_numpy(self.data.labels[name][target_rows]) for name in self.labels}


def event_gaps(data: InteractionData) -> np.ndarray:
    """Seconds since the same user's previous event, ``[N]``; -1 at each user's first event."""
    gaps = np.diff(data.timestamps, prepend=data.timestamps[:1]).astype(np.int64)
    gaps[data.offsets[:-1][data.lengths() > 0]] = -1
    return gaps


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each pair, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - seg_start)
