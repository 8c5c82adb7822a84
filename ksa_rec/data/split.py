"""Train/validation/test splits of ``InteractionData`` as index arrays (nothing is copied).

A split says, per user ``u`` (row of ``offsets``): training uses events ``[0:train_len[u])`` (inputs
``0..train_len-2`` predicting ``1..train_len-1``), and each evaluation target asks to "predict event
``position`` of user ``user`` from the history ``[0:position)``". Example, leave-one-out::

    user 0, n = 5 | e0 e1 e2 | e3    | e4   |   train_len 3, valid position 3, test position 4
                  |  train   | valid | test |
    user 1, n = 2 | e0 e1               |   train_len 2, not evaluated (n < 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ksa_rec.data.etl import InteractionData


@dataclass
class EvalTargets:
    """``K`` targets: predict event ``position[k]`` of user ``user[k]`` from its events
    ``[0:position[k])``."""

    user: np.ndarray       # int64 [K], row of offsets
    position: np.ndarray   # int64 [K], event index within that user (>= 1: the history is never empty)

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Splits:
    train_len: np.ndarray  # int64 [U]: training events [0:train_len[u]) of each user
    valid: EvalTargets
    test: EvalTargets


def leave_one_out(data: InteractionData) -> Splits:
    """Users with ``n >= 3`` events: train ``[0:n-2)``, validation target ``n-2``, test target ``n-1``
    (whose history includes the validation event). Users with ``n < 3``: all ``n`` events train, none
    evaluated (the SASRec/BSARec convention)."""
    n = data.lengths()
    evaluated = np.flatnonzero(n >= 3).astype(np.int64)
    train_len = np.where(n >= 3, n - 2, n).astype(np.int64)
    return Splits(train_len=train_len,
                  valid=EvalTargets(user=evaluated, position=n[evaluated] - 2),
                  test=EvalTargets(user=evaluated.copy(), position=n[evaluated] - 1))


def tail_split(data: InteractionData, tail: int) -> Splits:
    """Many targets per user, for long histories: each user's last ``tail`` events are test targets, the
    ``tail`` before them validation targets, the rest trains. Every target is predicted from all events
    before it. Users with ``n < 2 * tail + 2`` train on everything and are not evaluated.

    Leave-one-out scores one event per user; signals that are rare per event (e.g. the long-range
    targets of the synthetic data, ~5% of events) need this to be measured with any precision."""
    if tail < 1:
        raise ValueError(f"tail must be >= 1, got {tail}")
    n = data.lengths()
    evaluated = np.flatnonzero(n >= 2 * tail + 2).astype(np.int64)
    train_len = np.where(n >= 2 * tail + 2, n - 2 * tail, n).astype(np.int64)
    users = np.repeat(evaluated, tail)
    step = np.tile(np.arange(tail, dtype=np.int64), len(evaluated))
    first_valid = np.repeat(n[evaluated] - 2 * tail, tail)
    return Splits(train_len=train_len,
                  valid=EvalTargets(user=users, position=first_valid + step),
                  test=EvalTargets(user=users.copy(), position=first_valid + tail + step))


def temporal_split(data: InteractionData, valid_start: int, test_start: int) -> Splits:
    """Split by global time: training = events with ``timestamp < valid_start``; a user's validation
    target is their first event in ``[valid_start, test_start)``, their test target their first event
    ``>= test_start``; the history is always everything before the target. Targets at position 0 (no
    history to predict from) are left out."""
    if valid_start > test_start:
        raise ValueError(f"valid_start ({valid_start}) must not be after test_start ({test_start})")
    n = data.lengths()
    train_len = _count_per_user(data, data.timestamps < valid_start)
    before_test = _count_per_user(data, data.timestamps < test_start)
    # Timestamps are non-decreasing within a user, so "first event >= t" is at index count(< t).
    has_valid = (train_len < before_test) & (train_len >= 1)
    has_test = (before_test < n) & (before_test >= 1)
    valid_users = np.flatnonzero(has_valid).astype(np.int64)
    test_users = np.flatnonzero(has_test).astype(np.int64)
    return Splits(train_len=train_len,
                  valid=EvalTargets(user=valid_users, position=train_len[valid_users]),
                  test=EvalTargets(user=test_users, position=before_test[test_users]))


def temporal_cutoffs(data: InteractionData, valid_fraction: float = 0.1,
                     test_fraction: float = 0.1) -> tuple[int, int]:
    """``(valid_start, test_start)``: global timestamp quantiles such that about ``test_fraction`` of
    all events are at or after ``test_start`` and about ``valid_fraction`` fall in
    ``[valid_start, test_start)`` (ties at a cutoff make it approximate)."""
    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(f"need 0 < valid_fraction, test_fraction and their sum < 1, got "
                         f"{valid_fraction} and {test_fraction}")
    total = data.num_events
    if total == 0:
        raise ValueError("no events to take time quantiles of")
    # Index of the first test / validation event in time order, counted from the end.
    i_test = min(max(total - round(total * test_fraction), 0), total - 1)
    i_valid = min(max(i_test - round(total * valid_fraction), 0), total - 1)
    # np.partition is O(N), unlike a full sort of every timestamp.
    picked = np.partition(data.timestamps, [i_valid, i_test])
    return int(picked[i_valid]), int(picked[i_test])


def _count_per_user(data: InteractionData, mask: np.ndarray) -> np.ndarray:
    """int64 ``[U]``: number of True entries of the ``[N]`` mask inside each user's segment."""
    cumulative = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return cumulative[data.offsets[1:]] - cumulative[data.offsets[:-1]]
