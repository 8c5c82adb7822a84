"""Full causal attention over a jagged batch (the SASRec-style ``full`` layer without summaries).

Users are right-padded to the longest one and passed to ``scaled_dot_product_attention`` with
``is_causal=True``: because padding sits after every real event, the causal mask alone keeps real
queries off padded keys, so no extra mask is needed and SDPA keeps its flash/memory-efficient kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.utils.jagged import jagged_to_padded, padded_to_jagged, validate_offsets


def causal_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, *, max_len: int | None = None,
                     scale: float | None = None, check_offsets: bool = True) -> Tensor:
    """Causal self-attention within each user.

    Args:
        q, k, v: ``(sum_b n_b, H, D)`` jagged event streams (k, v may have fewer heads: GQA).
        offsets: int64 ``[B+1]``.
        max_len: ``max_b n_b`` if the caller knows it (saves a device->host sync).
        check_offsets: False skips validating ``offsets`` (device syncs), for callers that did it once.
    Returns:
        ``(sum_b n_b, H, D)``.
    """
    if check_offsets:
        validate_offsets(offsets, q.shape[0])
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    if max_len is None:
        max_len = int((offsets[1:] - offsets[:-1]).max())
    # One gather for all three streams (this path is launch-bound for short histories).
    heads, kv_heads = q.shape[1], k.shape[1]
    padded = jagged_to_padded(torch.cat([q, k, v], dim=1), offsets, max_len).transpose(1, 2)
    qp, kp, vp = padded.split([heads, kv_heads, kv_heads], dim=1)
    out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                         enable_gqa=kp.shape[1] != qp.shape[1])
    return padded_to_jagged(out.transpose(1, 2), offsets)
