"""The batch that flows from the DataModule into the model.

Users are a jagged batch: every key of ``features`` (a TorchRec ``KeyedJaggedTensor``) has the same
lengths, and ``offsets`` is their ``[B+1]`` cumulative form, computed on the host (fbgemm's CUDA
cumsum is not available with the CPU build of fbgemm-gpu). Example, B = 2, n = (3, 1)::

    features["item_id"] | 7  12  7 | 3 |      offsets   = [0, 3, 4]
    positions           | 8  9  10 | 0 |      (absolute index in each user's history)
    targets (training)  | 12 7  5  | 0 |      (next item; 0 = no label)
    eval_rows           |        2 | 3 |      (evaluation: rows whose states rank ...
    eval_targets        |        9 | 4 |       ... these items; here the item after each last event)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor

from ksa_rec.data.schema import ITEM, TIME_GAP
from ksa_rec.utils.jagged import lengths_to_offsets, positions_in_segment


@dataclass
class SequenceBatch:
    features: KeyedJaggedTensor
    offsets: Tensor
    """int64 ``[B+1]``."""
    positions: Tensor
    """int64 ``[T]``: absolute index of each event in its user's full history."""
    max_len: int
    """Longest user in the batch (host int: saves a device sync when padding)."""
    user_index: Tensor
    """int64 ``[B]``: row of the user in the processed data."""
    targets: Tensor | None = None
    """Training: int64 ``[T]`` next item at each event, 0 where there is none."""
    eval_rows: Tensor | None = None
    """Evaluation: int64 ``[R]`` row of the event stream whose state ranks each of the R targets
    (R = B for leave-one-out: each user's last event)."""
    eval_targets: Tensor | None = None
    """Evaluation: int64 ``[R]`` the items to rank."""
    seen_values: Tensor | None = None
    """Evaluation: items to exclude from each target's ranking, jagged int64 ``[sum_r m_r]`` ..."""
    seen_offsets: Tensor | None = None
    """... with offsets ``[R+1]``."""
    labels: dict[str, Tensor] = field(default_factory=dict)
    """Evaluation: per-target int64 ``[R]`` labels of the target event (e.g. ``evidence_distance``)."""

    @classmethod
    def of_events(cls, lengths: np.ndarray, positions: np.ndarray, user_index: np.ndarray, items: np.ndarray,
                  features: dict[str, np.ndarray], time_gaps: np.ndarray | None) -> SequenceBatch:
        """The batch of B users' events, the one way training, evaluation and serving build it.

        Args:
            lengths: ``[B]`` events per user; positions: ``[T]`` absolute index of each event in its user's
                history; user_index: ``[B]``; items: ``[T]`` dense item ids.
            features: dense ids ``[T]`` per side feature; time_gaps: ``[T]`` time-gap buckets
                (``schema.time_gap_bucket``) or None when the model has no time-gap table.
        The KeyedJaggedTensor's keys are ``[item_id] + sorted(features) + [time_gap]``.
        """
        keys = [ITEM, *sorted(features)] + ([TIME_GAP] if time_gaps is not None else [])
        values = [items, *(features[name] for name in sorted(features))]
        values += [time_gaps] if time_gaps is not None else []
        key_lengths = torch.from_numpy(np.tile(lengths.astype(np.int64), len(keys)))
        kjt = KeyedJaggedTensor(keys=keys, values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
                                lengths=key_lengths, offsets=lengths_to_offsets(key_lengths))
        return cls(features=kjt, offsets=lengths_to_offsets(torch.from_numpy(lengths.astype(np.int64))),
                   positions=torch.from_numpy(positions.astype(np.int64)), max_len=int(lengths.max(initial=0)),
                   user_index=torch.from_numpy(user_index.astype(np.int64)))

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SequenceBatch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return SequenceBatch(
            features=self.features.to(device, non_blocking=non_blocking), offsets=move(self.offsets),
            positions=move(self.positions), max_len=self.max_len, user_index=move(self.user_index),
            targets=move(self.targets), eval_rows=move(self.eval_rows), eval_targets=move(self.eval_targets),
            seen_values=move(self.seen_values), seen_offsets=move(self.seen_offsets),
            labels={k: move(v) for k, v in self.labels.items()})


def random_training_batch(users: int, events: int, num_items: int, generator: torch.Generator) -> SequenceBatch:
    """``users`` histories of ``events`` uniform item ids with next-item targets (none after each user's
    last event): the input of speed benchmarks, where only shapes matter."""
    lengths = torch.full((users,), events, dtype=torch.int64)
    offsets = lengths_to_offsets(lengths)
    items = torch.randint(2, num_items, (users * events,), generator=generator)
    targets = torch.randint(2, num_items, (users * events,), generator=generator)
    targets[offsets[1:] - 1] = 0
    return SequenceBatch(features=KeyedJaggedTensor.from_lengths_sync([ITEM], items, lengths), offsets=offsets,
                         positions=positions_in_segment(offsets), max_len=events, user_index=torch.arange(users),
                         targets=targets)
