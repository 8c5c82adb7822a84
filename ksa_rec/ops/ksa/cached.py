"""KSA attention of new tokens against cached keys: the serving (step / decode) form of the op.

Training sees whole histories; serving sees a few new tokens per user and the K/V that user's state
kept. Every token carries its identity, so the rule of KSA.md section 3 is applied by index, whatever
the cache kept or in which order:

- an event query is its absolute event index ``i``; a summary query is its summary id ``c*S + j``;
- cached event keys carry their absolute event index, cached summary keys their summary id.

Event query ``i`` sees event key ``j`` iff ``j <= i`` and ``c(i) - c(j) <= W`` (or ``i - j <= w`` with a
token window ``w``: the ``swa`` kind), and summary key ``c*S + j'`` iff ``c(i)-W-M <= c < c(i)-W``.
Summary query ``c*S + j`` sees event keys of chunk c and summary keys ``c*S + j'`` with ``j' <= j``.
``window=None`` is a full layer (events see all earlier events, no summaries).

Layout: per user b, queries ``q[q_offsets[b]:q_offsets[b+1]]``, event keys ``k[k_offsets[b]:...]`` and
summary keys ``k_sum[s_offsets[b]:...]``; all jagged, ``[rows, heads, D]``. The caller appends the new
tokens' own K/V to the cache before calling (a token sees itself).

Backends: ``"torch"`` (this file: padded SDPA with a visibility mask, the reference) and ``"triton"``
(``triton_cached.py``: one fused launch for the batch, memory-bound streaming of each user's cache,
imported lazily). ``backend=None`` picks triton for CUDA tensors in fp16/bf16/fp32 when it imports,
torch otherwise.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.utils.jagged import offsets_to_lengths, segment_ids


def ksa_cached_attention(q: Tensor, q_offsets: Tensor, q_index: Tensor, q_is_summary: Tensor,
                         k: Tensor, v: Tensor, k_offsets: Tensor, k_index: Tensor,
                         k_sum: Tensor, v_sum: Tensor, s_offsets: Tensor, s_index: Tensor, *,
                         chunk_size: int, window: int | None, summary_tokens: int,
                         max_summaries: int | None = None, window_tokens: int | None = None,
                         scale: float | None = None, backend: str | None = None) -> Tensor:
    """Attention of ``q (sum_b Q_b, H, D)`` to each user's cached event and summary keys.

    Args:
        q_index: int64 ``[sum Q_b]``: absolute event index (events) or summary id ``c*S + j`` (summaries).
        q_is_summary: bool ``[sum Q_b]``.
        k, v: ``(sum_b K_b, Hkv, D)`` cached event keys/values (RoPE already applied to k);
            k_index: int64 ``[sum K_b]`` their absolute event indices.
        k_sum, v_sum: ``(sum_b M_b, Hkv, D)`` cached summary keys/values; s_index: their summary ids.
        window_tokens: use a token window instead of the chunk window (``swa`` layers; no summaries).
        backend: None (auto: module docstring), ``"torch"`` or ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``).
    Returns:
        ``(sum_b Q_b, H, D)``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 0 or k.shape[0] + k_sum.shape[0] == 0:
        return q.new_zeros(q.shape)
    if resolve_backend(backend, q) == "triton":
        return _triton_function()(q, q_offsets, q_index, q_is_summary, k, v, k_offsets, k_index, k_sum, v_sum,
                                  s_offsets, s_index, chunk_size=chunk_size, window=window,
                                  summary_tokens=summary_tokens, max_summaries=max_summaries,
                                  window_tokens=window_tokens, scale=scale)
    plan = plan_cached_attention(q_offsets, q_index, q_is_summary, k_offsets, k_index, s_offsets, s_index,
                                 chunk_size=chunk_size, window=window, summary_tokens=summary_tokens,
                                 max_summaries=max_summaries, window_tokens=window_tokens, dtype=q.dtype)
    return attend_cached(plan, q, torch.cat([k, k_sum]), torch.cat([v, v_sum]), scale)


@dataclass
class CachedPlan:
    """The torch path's padded problem: it depends on the layout and the identities only, so the layers
    of a stack whose caches keep the same rows share one (``KindAttention.step``).

    Key table: ``cat([k, k_sum])`` rows. ``None`` rows mean one user, whose rows are already the padded
    problem (no gathers).
    """

    query_rows: Tensor | None
    """``[B, Qmax]`` rows of q per padded query slot (padding repeats a valid row; its output is dropped)."""
    key_rows: Tensor | None
    """``[B, Kmax + Smax]`` rows of the key table: each user's event keys padded to Kmax, then its summary
    keys padded to Smax (padding points at row 0 and is masked out)."""
    out_rows: Tensor | None
    """``[sum Q_b]`` rows of the flattened ``[B * Qmax]`` output that hold q's rows."""
    mask: Tensor
    """``[B, 1, Qmax, Kmax + Smax]`` additive: 0 where visible, -inf elsewhere (what SDPA would make of a
    bool mask on every call)."""


def plan_cached_attention(q_offsets: Tensor, q_index: Tensor, q_is_summary: Tensor, k_offsets: Tensor,
                          k_index: Tensor, s_offsets: Tensor, s_index: Tensor, *, chunk_size: int,
                          window: int | None, summary_tokens: int, max_summaries: int | None = None,
                          window_tokens: int | None = None, dtype: torch.dtype) -> CachedPlan:
    """``CachedPlan`` of ``ksa_cached_attention``'s torch path (same arguments, without the K/V; ``dtype``:
    the queries').

    Needs at least one query and one key. More than one user costs one device sync (the longest rows)."""
    if q_offsets.numel() == 2:
        query_rows = key_rows = out_rows = None
        qi, qs, ki, si = q_index[None], q_is_summary[None], k_index[None], s_index[None]
    else:
        big = torch.iinfo(torch.int64).max // 4  # padding keys: never visible (> any query index)
        q_len, k_len, s_len = (offsets_to_lengths(o) for o in (q_offsets, k_offsets, s_offsets))
        qmax, kmax, smax = torch.stack([q_len.max(), k_len.max(), s_len.max()]).tolist()
        query_rows = q_offsets[:-1, None] + torch.arange(qmax, device=q_offsets.device)
        query_rows = query_rows.clamp_(max=q_index.numel() - 1)
        width = torch.arange(kmax + smax, device=k_offsets.device)
        is_event_col = width < kmax
        start = torch.where(is_event_col, k_offsets[:-1, None], k_index.numel() + s_offsets[:-1, None] - kmax)
        valid = width < torch.where(is_event_col, k_len[:, None], kmax + s_len[:, None])
        key_rows = torch.where(valid, start + width, 0)
        key_index = torch.where(valid, torch.cat([k_index, s_index])[key_rows], big)
        ki, si = key_index[:, :kmax], key_index[:, kmax:]
        qi, qs = q_index[query_rows], q_is_summary[query_rows]
        seg = segment_ids(q_offsets, q_index.numel())
        out_rows = seg * qmax + torch.arange(q_index.numel(), device=seg.device) - q_offsets[seg]
    mask = torch.cat([_event_key_mask(qi, qs, ki, chunk_size, window, window_tokens, summary_tokens),
                      _summary_key_mask(qi, qs, si, chunk_size, window, summary_tokens, max_summaries,
                                        window_tokens)], dim=2)
    # A query that sees nothing gets one key so the softmax stays finite (padding rows are dropped).
    mask[:, :, 0] |= ~mask.any(dim=2)
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return CachedPlan(query_rows, key_rows, out_rows, additive[:, None])


def attend_cached(plan: CachedPlan, q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """``q [sum Q_b, H, D]`` against the key table ``keys, values [rows, Hkv, D]`` -> ``[sum Q_b, H, D]``."""
    def padded(x, rows):
        return (x[None] if rows is None else x[rows]).transpose(1, 2)

    qp, kp = padded(q, plan.query_rows), padded(keys, plan.key_rows)
    out = F.scaled_dot_product_attention(qp, kp, padded(values, plan.key_rows), attn_mask=plan.mask, scale=scale,
                                         enable_gqa=kp.shape[1] != qp.shape[1]).transpose(1, 2)
    return out[0] if plan.out_rows is None else out.flatten(0, 1)[plan.out_rows]


def _event_key_mask(qi, qs, ki, k, window, window_tokens, S) -> Tensor:
    """``[B, Q, K]``: which cached event keys each query sees."""
    i, j = qi[:, :, None], ki[:, None, :]
    if window_tokens is not None:
        event_sees = (j <= i) & (i - j <= window_tokens)
    else:
        event_sees = j <= i
        if window is not None:
            event_sees &= (i // k) - (j // k) <= window
    own_chunk = (j // k) == (i // max(S, 1))  # summary query's chunk = its id // S
    return torch.where(qs[:, :, None], own_chunk, event_sees)


def _summary_key_mask(qi, qs, si, k, window, S, max_summaries, window_tokens) -> Tensor:
    """``[B, Q, M]``: which cached summary keys each query sees."""
    i, sid = qi[:, :, None], si[:, None, :]
    if S == 0:
        return torch.zeros(qi.shape + (si.shape[1],), dtype=torch.bool, device=qi.device)
    chunk = sid // S
    if window is None or window_tokens is not None:
        event_sees = torch.zeros_like(chunk, dtype=torch.bool).expand(i.shape[0], i.shape[1], -1)
    else:
        gap = (i // k) - chunk
        event_sees = gap > window
        if max_summaries is not None:
            event_sees = event_sees & (gap <= window + max_summaries)
    summary_sees = (chunk == i // S) & (sid <= i)
    return torch.where(qs[:, :, None], summary_sees, event_sees)


def resolve_backend(backend: str | None, q: Tensor) -> str:
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"ksa_cached_attention: backend must be None, 'torch' or 'triton', got {backend!r}")
    if backend is None:
        usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return "triton" if usable and _triton_available() else "torch"
    if backend == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"ksa_cached_attention: backend='triton' needs CUDA tensors, got q on {q.device} "
                         "(set TRITON_INTERPRET=1 to run the kernel on CPU)")
    return backend


def _triton_function():
    from ksa_rec.ops.ksa.triton_cached import ksa_cached_attention_triton

    return ksa_cached_attention_triton


@functools.cache
def _triton_available() -> bool:
    """Whether the Triton kernel imports (cached: auto mode asks on every call)."""
    try:
        _triton_function()
    except ImportError:
        return False
    return True


__all__ = ["CachedPlan", "attend_cached", "ksa_cached_attention", "plan_cached_attention", "resolve_backend"]
