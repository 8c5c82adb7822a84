"""Chunk-aligned truncation: drop only whole oldest chunks anchored at the first event."""

from __future__ import annotations

import numpy as np
import pytest

from ksa_rec.data.truncation import chunk_aligned_start


@pytest.mark.parametrize("end, max_len, chunk_size, start", [
    (11, 8, 4, 4),    # start 0 keeps 11 > 8; 4 keeps 7
    (8, 8, 4, 0),     # fits exactly
    (9, 8, 4, 4),     # one event over -> a whole chunk goes
    (12, 8, 4, 4),
    (13, 8, 4, 8),
    (0, 8, 4, 0),     # empty history
    (3, 8, 4, 0),
    (10, 5, 4, 8),    # max_len not a multiple of k: keeps 2 (start 4 would keep 6 > 5)
    (10, 3, 1, 7),    # k = 1 is plain truncation
])
def test_hand_examples(end, max_len, chunk_size, start):
    got = chunk_aligned_start(end, max_len, chunk_size)
    assert got == start and isinstance(got, int)
    assert end - got <= max_len and got % chunk_size == 0


def test_elementwise_and_minimal():
    ends = np.arange(0, 200, dtype=np.int32).reshape(10, 20)
    starts = chunk_aligned_start(ends, 50, 8)
    assert starts.dtype == np.int64 and starts.shape == ends.shape
    assert np.all(ends - starts <= 50) and np.all(starts % 8 == 0) and np.all(starts >= 0)
    # Minimal: one chunk earlier would be too long (or below 0).
    assert np.all((starts == 0) | (ends - (starts - 8) > 50))


def test_errors():
    with pytest.raises(ValueError, match=r"max_len \(3\) must be >= chunk_size \(4\)"):
        chunk_aligned_start(10, 3, 4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunk_aligned_start(10, 3, 0)
    with pytest.raises(ValueError, match="end must be >= 0"):
        chunk_aligned_start(np.array([1, -1]), 8, 4)
    with pytest.raises(TypeError, match="integer"):
        chunk_aligned_start(np.array([1.5]), 8, 4)
