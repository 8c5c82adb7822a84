"""Full causal attention over a jagged batch (the SASRec-style ``full`` layer without summaries).

Which kernel runs is ``ksa_rec.ops.backend.resolve_full_path``'s rule: SDPA on a view when every user has
the same length, FlashAttention's varlen kernel (CUDA, fp16/bf16) or the KSA op's full rule (CUDA, fp32)
on the jagged rows when lengths differ, and right-padding plus SDPA otherwise (CPU). Padding sits after
every real event, so on the padded path the causal mask alone keeps real queries off padded keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.ops.backend import FULL_PATHS, resolve_full_path, varlen_causal_kwargs
from ksa_rec.ops.ksa import KsaRule, ksa_attention
from ksa_rec.utils.jagged import jagged_to_padded, padded_to_jagged, validate_offsets


def causal_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, *, max_len: int | None = None,
                     scale: float | None = None, check_offsets: bool = True, path: str | None = None,
                     backend: str | None = None, tables: dict | None = None) -> Tensor:
    """Causal self-attention within each user.

    Args:
        q, k, v: ``(sum_b n_b, H, D)`` jagged event streams (k, v may have fewer heads: GQA).
        offsets: int64 ``[B+1]``.
        max_len: ``max_b n_b`` if the caller knows it (saves a device->host sync).
        check_offsets: False skips validating ``offsets`` (device syncs), for callers that did it once.
        path: one of ``FULL_PATHS`` to force a kernel (tests, benchmarks); None applies the rule.
        backend: the caller's attention backend (``ksa_rec.ops.backend``): the KSA op's full rule runs only
            where it is None (auto) or ``"triton"``, and then on it, sharing ``tables`` (``ksa_attention``).
    Returns:
        ``(sum_b n_b, H, D)``.
    """
    if check_offsets:
        validate_offsets(offsets, q.shape[0])
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    if max_len is None:
        max_len = int((offsets[1:] - offsets[:-1]).max())
    batch = offsets.numel() - 1
    if path is None:
        path = resolve_full_path(q.device, q.dtype, q.shape[0], batch, max_len, q.shape[-1], k.shape[1] == q.shape[1],
                                 backend)
    elif path not in FULL_PATHS:
        raise ValueError(f"causal attention path must be one of {', '.join(FULL_PATHS)}, got {path!r}")
    if path == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu = offsets.to(torch.int32)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **varlen_causal_kwargs())
    if path == "ksa":
        none = q.new_zeros((0, *q.shape[1:]))
        return ksa_attention(q, k, v, none, none[:, :k.shape[1]], none[:, :k.shape[1]], offsets,
                             KsaRule(1, None, 0), scale=scale, backend=backend, check_offsets=False,
                             tables=tables)[0]
    heads, kv_heads = q.shape[1], k.shape[1]
    if path == "dense":
        if q.shape[0] != batch * max_len:
            raise ValueError(f"causal attention path 'dense' needs {batch} users of {max_len} events, "
                             f"got {q.shape[0]} rows")
        qp, kp, vp = (x.view(batch, max_len, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    else:  # one gather for all three streams (this path is launch-bound for short histories)
        padded = jagged_to_padded(torch.cat([q, k, v], dim=1), offsets, max_len).transpose(1, 2)
        qp, kp, vp = padded.split([heads, kv_heads, kv_heads], dim=1)
    out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=kv_heads != heads)
    out = out.transpose(1, 2)
    return out.reshape(q.shape) if path == "dense" else padded_to_jagged(out, offsets, q.shape[0])
