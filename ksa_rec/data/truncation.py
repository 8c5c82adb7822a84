"""Chunk-aligned truncation of long histories (KSA.md section 6: train/serve parity).

Chunks of ``chunk_size`` events are anchored at the user's first event (event ``i`` is in chunk
``i // chunk_size``). Cutting a history ``[0:end)`` to at most ``max_len`` events may drop only whole
oldest chunks, so training sees exactly the chunks a streaming state builds. Example, k = 4,
end = 11, max_len = 8::

    events  | 0 1 2 3 | 4 5 6 7 | 8 9 10 |
    chunks  | dropped |   kept  |  kept  |   start = 4 (7 events kept; start 0 would keep 11 > 8)
"""

from __future__ import annotations

from typing import overload

import numpy as np


@overload
def chunk_aligned_start(end: int, max_len: int, chunk_size: int) -> int: ...
@overload
def chunk_aligned_start(end: np.ndarray, max_len: int, chunk_size: int) -> np.ndarray: ...


def chunk_aligned_start(end, max_len, chunk_size):
    """First kept event index of the history ``[0:end)``: the smallest multiple of ``chunk_size`` with
    ``end - start <= max_len``, i.e. ``max(0, ceil((end - max_len) / chunk_size) * chunk_size)``.

    ``end``: an int or an int array of any shape (elementwise; returns int64 of the same shape).
    ``max_len < chunk_size`` is refused: dropping whole chunks could then leave no history at all.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_len < chunk_size:
        raise ValueError(f"max_len ({max_len}) must be >= chunk_size ({chunk_size}): truncation drops whole "
                         f"chunks, so a window shorter than one chunk cannot hold a history")
    ends = np.asarray(end)
    if not np.issubdtype(ends.dtype, np.integer):
        raise TypeError(f"end must be an integer or an integer array, got {ends.dtype}")
    if np.any(ends < 0):
        raise ValueError("end must be >= 0")
    # Ceil division of the excess by the chunk size, in integers (no float rounding on big ends).
    excess = ends.astype(np.int64) - max_len
    start = np.maximum(-(-excess // chunk_size) * chunk_size, 0)
    return int(start) if ends.ndim == 0 else start
