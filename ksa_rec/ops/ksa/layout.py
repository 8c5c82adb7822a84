"""The two-stream jagged layout of KSA (KSA.md section 5).

Event stream: ``[T, ...]`` with ``offsets [B+1]``. Summary stream: ``[Ts, ...]`` where user b owns
``S * (n_b // k)`` consecutive rows in user order: chunk-major, slot-minor
(row ``sum_offsets[b] + c*S + j`` is summary ``s_{c,j}`` of user b). Example, k = 2, S = 1,
n = (5, 1)::

    events    | t0 t1 t2 t3 t4 | u0 |     offsets     = [0, 5, 6]
    summaries | s0    s1       |    |     sum_offsets = [0, 2, 2]
"""

from __future__ import annotations

import torch
from torch import Tensor

from ksa_rec.utils.jagged import lengths_to_offsets, offsets_to_lengths, segment_ids


def num_chunks(lengths: Tensor, chunk_size: int) -> Tensor:
    """Complete chunks per user, ``[B]``."""
    return torch.div(lengths, chunk_size, rounding_mode="floor")


def summary_offsets(offsets: Tensor, chunk_size: int, summary_tokens: int) -> Tensor:
    """Event offsets ``[B+1]`` -> summary-stream offsets ``[B+1]``."""
    return lengths_to_offsets(summary_tokens * num_chunks(offsets_to_lengths(offsets), chunk_size))


def summary_index(offsets: Tensor, chunk_size: int, summary_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """For every summary row: (owning user ``[Ts]``, chunk index ``[Ts]``, slot index ``[Ts]``)."""
    s_off = summary_offsets(offsets, chunk_size, summary_tokens)
    total = int(s_off[-1])
    user = segment_ids(s_off, total)
    local = torch.arange(total, device=offsets.device) - s_off[user]
    return user, torch.div(local, summary_tokens, rounding_mode="floor"), local % summary_tokens


def summary_position(chunk: Tensor, slot: Tensor, chunk_size: int, summary_tokens: int) -> Tensor:
    """Index within its user of the event whose position summary ``s_{c,j}`` takes (KSA.md section 4): the
    last event of the j-th of S equal slices of chunk c, ``c*k + (j+1)*(k//S) - 1`` (``k % S == 0``)."""
    return chunk * chunk_size + (slot + 1) * (chunk_size // summary_tokens) - 1
