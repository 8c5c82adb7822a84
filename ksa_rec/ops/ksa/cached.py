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

Backends: ``"torch"`` (this file: padded SDPA with a boolean mask, the reference) and ``"triton"``
(``triton_cached.py``: one fused launch for the batch, memory-bound streaming of each user's cache,
imported lazily). ``backend=None`` picks triton for CUDA tensors in fp16/bf16/fp32 when it imports,
torch otherwise.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.utils.jagged import jagged_to_padded, offsets_to_lengths


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
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    if _resolve_backend(backend, q) == "triton":
        return _triton_function()(q, q_offsets, q_index, q_is_summary, k, v, k_offsets, k_index, k_sum, v_sum,
                                  s_offsets, s_index, chunk_size=chunk_size, window=window,
                                  summary_tokens=summary_tokens, max_summaries=max_summaries,
                                  window_tokens=window_tokens, scale=scale)
    q_len, k_len, s_len = (offsets_to_lengths(o) for o in (q_offsets, k_offsets, s_offsets))
    qmax, kmax, smax = (max(int(x.max()), 1) for x in (q_len, k_len, s_len))
    big = torch.iinfo(torch.int64).max // 4
    qp = jagged_to_padded(q, q_offsets, qmax).transpose(1, 2)  # [B, H, Q, D]
    keys = torch.cat([jagged_to_padded(k, k_offsets, kmax), jagged_to_padded(k_sum, s_offsets, smax)], 1)
    values = torch.cat([jagged_to_padded(v, k_offsets, kmax), jagged_to_padded(v_sum, s_offsets, smax)], 1)
    qi = jagged_to_padded(q_index, q_offsets, qmax, pad_value=0)
    qs = jagged_to_padded(q_is_summary, q_offsets, qmax, pad_value=False)
    ki = jagged_to_padded(k_index, k_offsets, kmax, pad_value=big)  # padding: never visible (> any i)
    si = jagged_to_padded(s_index, s_offsets, smax, pad_value=big)
    mask = torch.cat([_event_key_mask(qi, qs, ki, chunk_size, window, window_tokens, summary_tokens),
                      _summary_key_mask(qi, qs, si, chunk_size, window, summary_tokens, max_summaries,
                                        window_tokens)], dim=2)
    # Padded query rows see nothing; give them one key so the softmax stays finite (rows are dropped).
    mask[:, :, 0] |= ~mask.any(dim=2)
    out = F.scaled_dot_product_attention(qp, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None],
                                         scale=scale, enable_gqa=keys.shape[2] != qp.shape[1])
    return out.transpose(1, 2)[_valid_rows(q_len, qmax)]


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


def _resolve_backend(backend: str | None, q: Tensor) -> str:
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


def _valid_rows(lengths: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


__all__ = ["ksa_cached_attention"]
