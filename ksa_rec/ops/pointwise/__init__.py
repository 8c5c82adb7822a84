"""Pointwise (SiLU) attention with a relative-position bias: the attention of HSTU (Zhai et al., 2024).

No softmax: a query's output is the sum over the keys it sees of ``silu(q . k + bias(distance)) * v``, divided
by a constant, so how much a user did (the number of matching events) stays in the output instead of being
normalised away. The rule of who sees whom is plain causal: a query at absolute event index ``i`` sees the keys
of its own user at indices ``j <= i``; ``distance = i - j`` indexes a learned table per head, clamped to its
last entry. The same function serves the training pass (queries = keys = the batch's events) and a streaming
step (queries = the new events, keys = the cached events then the new ones), so the two agree by construction.

Torch only: the users are padded to ``[B, Lq, Lk]`` score tiles, which costs memory quadratic in the longest
history of the batch (fine at the 50-200 events of the public benchmarks; not a long-history kind).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ksa_rec.utils.jagged import segment_ids

_FAR = -(2**62)
"""Position of a padded key row: no query is that far ahead of it, and it is masked out anyway."""


def pointwise_attention(q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, q_positions: Tensor, k_offsets: Tensor,
                        k_positions: Tensor, bias: Tensor, *, normalizer: float, max_q: int | None = None,
                        max_k: int | None = None) -> Tensor:
    """Causal pointwise attention of jagged queries over jagged keys of the same B users, differentiable.

    Args:
        q: ``(sum_b m_b, H, D)`` queries, user b's rows ``q_offsets[b]:q_offsets[b+1]``, absolute event indices
            ``q_positions [sum m_b]``.
        k, v: ``(sum_b n_b, H, D)`` keys and values with ``k_offsets [B+1]``, ``k_positions [sum n_b]``.
        bias: ``[H, R]`` learned bias by distance ``0 .. R-1`` (longer distances take entry ``R-1``).
            Each user's positions must be consecutive (as in training batches and streaming states); passing
            the same ``q_positions`` tensor as ``k_positions`` (a batch attending to itself) reads the distance
            from the row numbers.
        normalizer: the constant the sum is divided by (HSTU: the training sequence length).
        max_q, max_k: the longest user's query / key rows, if known (else read from the offsets: a host sync).

    Returns:
        ``(sum_b m_b, H, D)`` in q's dtype: ``sum_{j: same user, pos_j <= pos_i} silu(q_i.k_j + bias[h, pos_i -
        pos_j]) v_j / normalizer``.
    """
    if max_q is None:
        max_q = int((q_offsets[1:] - q_offsets[:-1]).max()) if q_offsets.numel() > 1 else 0
    if max_k is None:
        max_k = int((k_offsets[1:] - k_offsets[:-1]).max()) if k_offsets.numel() > 1 else 0
    if not q.shape[0] or not max_k:
        return q.new_zeros(q.shape)
    q_user, q_row = _rows(q_offsets, q.shape[0])
    qp = _pad(q, q_user, q_row, q_offsets.numel() - 1, max_q, 0)
    k_user, k_row = (q_user, q_row) if k_offsets is q_offsets else _rows(k_offsets, k.shape[0])
    batch = k_offsets.numel() - 1
    kp, vp = _pad(k, k_user, k_row, batch, max_k, 0), _pad(v, k_user, k_row, batch, max_k, 0)
    last = bias.shape[1] - 1
    if q_positions is k_positions:
        # The training form (a batch attending to itself): with consecutive positions the distance is the row
        # difference, one [Lq, Lk] table for the whole batch. Gathering per (user, query, key) instead made the
        # backward sum ~B*L duplicates of each bias entry, serially on CUDA (an ML-1M epoch of 8 layers: minutes).
        rows = torch.arange(max(max_q, max_k), device=q.device)
        distance = rows[:max_q, None] - rows[None, :max_k]  # [Lq, Lk]
        key_real = torch.arange(max_k, device=q.device) < (k_offsets[1:] - k_offsets[:-1])[:, None]  # [B, Lk]
        seen = (distance >= 0) & key_real[:, None, :]
        rel = bias[:, distance.clamp(0, last)][None]  # [1, H, Lq, Lk]
    else:  # a streaming step's new events over cached ones (no gradient in serving)
        q_pos = _pad(q_positions, q_user, q_row, batch, max_q, 0)
        k_pos = _pad(k_positions, k_user, k_row, batch, max_k, _FAR)
        distance = q_pos[:, :, None] - k_pos[:, None, :]  # [B, Lq, Lk]; padded keys are far, padded queries unread
        seen = (distance >= 0) & (k_pos[:, None, :] != _FAR)
        rel = bias[:, distance.clamp(0, last)].transpose(0, 1)  # [B, H, Lq, Lk]
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kp) + rel.to(qp.dtype)
    weights = F.silu(scores) * (seen[:, None] / normalizer).to(scores.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", weights, vp)[q_user, q_row]


def _rows(offsets: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Each of ``total`` jagged rows' user and index within the user (no host read: capturable)."""
    user = segment_ids(offsets, total)
    return user, torch.arange(total, device=offsets.device) - offsets[user]


def _pad(values: Tensor, user: Tensor, row: Tensor, batch: int, length: int, fill) -> Tensor:
    """Jagged ``values (T, ...)`` -> right-padded ``[batch, length, ...]``. ``utils.jagged.jagged_to_padded`` with the
    row indices computed once for q, k, v and both position tensors, instead of once per call."""
    out = values.new_full((batch, length, *values.shape[1:]), fill)
    out[user, row] = values
    return out


__all__ = ["pointwise_attention"]
