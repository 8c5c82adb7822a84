"""Jagged-batch helpers on plain torch ops (no fbgemm: its CUDA ops are missing on CPU-only builds).

One layout everywhere: ``values`` of shape ``(sum_b n_b, ...)`` plus ``offsets`` int64 ``[B+1]`` with
``offsets[0] == 0`` and ``offsets[b+1] - offsets[b] == n_b``. Example, B = 2, n = (3, 1)::

    values  | a0 a1 a2 | b0 |
    offsets | 0        3    4
"""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_to_offsets(lengths: Tensor) -> Tensor:
    """``[B]`` lengths -> ``[B+1]`` int64 offsets."""
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=out[1:])
    return out


def offsets_to_lengths(offsets: Tensor) -> Tensor:
    """``[B+1]`` offsets -> ``[B]`` lengths."""
    return offsets[1:] - offsets[:-1]


def segment_ids(offsets: Tensor, total: int | None = None) -> Tensor:
    """Row -> owning segment, ``[T]`` int64 (``T = offsets[-1]``)."""
    lengths = offsets_to_lengths(offsets)
    n = int(offsets[-1]) if total is None else total
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths,
                                   output_size=n)


def positions_in_segment(offsets: Tensor, total: int | None = None) -> Tensor:
    """Index of each row within its own segment, ``[T]`` int64."""
    seg = segment_ids(offsets, total)
    return torch.arange(seg.numel(), device=offsets.device) - offsets[seg]


def jagged_to_padded(values: Tensor, offsets: Tensor, max_len: int, pad_value: float = 0.0) -> Tensor:
    """``(T, *F)`` jagged -> ``[B, max_len, *F]`` right-padded. Rows beyond ``max_len`` are dropped. No host read
    (a CUDA graph can capture it)."""
    batch = offsets.numel() - 1
    out = values.new_full((batch * max_len + 1, *values.shape[1:]), pad_value)
    if values.shape[0]:
        seg = segment_ids(offsets, values.shape[0])
        pos = torch.arange(values.shape[0], device=values.device) - offsets[seg]
        # rows beyond max_len land on a scratch row past the end: a boolean mask would read the device back
        out[torch.where(pos < max_len, seg * max_len + pos, batch * max_len)] = values
    return out[:-1].view(batch, max_len, *values.shape[1:])


def padded_to_jagged(padded: Tensor, offsets: Tensor, total: int | None = None) -> Tensor:
    """``[B, L, *F]`` right-padded -> ``(T, *F)`` jagged; ``n_b <= L`` is required. ``total`` (T, when the caller
    knows it) spares the host read of ``offsets[-1]``."""
    total = int(offsets[-1]) if total is None else total
    seg = segment_ids(offsets, total)
    pos = torch.arange(total, device=padded.device) - offsets[seg]
    return padded[seg, pos]


def validate_offsets(offsets: Tensor, total: int, *, name: str = "offsets") -> None:
    """Raise ``ValueError`` with one line if ``offsets`` is not a valid ``[B+1]`` layout of ``total`` rows."""
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor of B+1 entries, got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 (or int32), got {offsets.dtype}")
    # Every check in one host read (each read of a CUDA tensor is a sync); the reads below only word the
    # message of a layout already known to be bad.
    bad = (offsets[0] != 0) | (offsets[-1] != total)
    if offsets.numel() > 1:
        bad = bad | (offsets[1:] < offsets[:-1]).any()
    if not bool(bad):
        return
    if int(offsets[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(offsets[0])}")
    if int(offsets[-1]) != total:
        raise ValueError(f"{name}[-1] = {int(offsets[-1])} does not match the {total} rows given")
    raise ValueError(f"{name} must be non-decreasing")
