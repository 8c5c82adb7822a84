"""Brute-force KSA: builds the dense visibility mask of KSA.md section 3 per user. Test oracle only.

It is written to be obviously right, not fast: O(n^2) memory per user, and it states the rule on its own
(it does not use ``KsaRule``), so that tests comparing every backend against ``ksa_dense`` check the rule
object too. Production code calls ``ksa_rec.ops.ksa_attention``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ksa_rec.ops.ksa.layout import summary_offsets


def ksa_visibility(n: int, chunk_size: int, window: int | None, summary_tokens: int,
                   max_summaries: int | None = None, device=None, window_unit: int | None = None) -> Tensor:
    """Dense boolean mask ``[n + S*C, n + S*C]`` (rows: queries, cols: keys) for one user.

    Token order inside the mask: the n events, then the summaries chunk-major, slot-minor. ``window_unit``
    u (default k): an event sees the events ``j <= i`` with ``i // u - j // u <= W``; with ``u != k`` (a
    token window for u = 1) events see no summaries.
    """
    k, S = chunk_size, summary_tokens
    C = n // k
    i = torch.arange(n, device=device)
    ci = torch.div(i, k, rounding_mode="floor")
    sc = torch.arange(C, device=device).repeat_interleave(S)  # chunk of each summary
    sj = torch.arange(S, device=device).repeat(C)  # slot of each summary
    W = math.inf if window is None else window
    M = math.inf if max_summaries is None else max_summaries

    u = k if window_unit is None else window_unit
    ui = torch.div(i, u, rounding_mode="floor")
    ev_ev = (i[None, :] <= i[:, None]) & ((ui[:, None] - ui[None, :]) <= W)
    gap = ci[:, None] - sc[None, :]  # c(i) - c
    ev_sum = (gap > W) & (gap <= W + M) & (u == k)
    sum_ev = sc[:, None] == ci[None, :]
    sum_sum = (sc[:, None] == sc[None, :]) & (sj[None, :] <= sj[:, None])
    top = torch.cat([ev_ev, ev_sum], dim=1)
    bottom = torch.cat([sum_ev, sum_sum], dim=1)
    return torch.cat([top, bottom], dim=0)


def ksa_dense(q: Tensor, k: Tensor, v: Tensor, q_sum: Tensor, k_sum: Tensor, v_sum: Tensor,
              offsets: Tensor, *, chunk_size: int, window: int | None, summary_tokens: int = 1,
              scale: float | None = None, max_summaries: int | None = None,
              window_unit: int | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as ``ksa_rec.ops.ksa_attention`` (see there), computed with dense masks.

    Shapes: q, k, v ``[T, H, D]``; q_sum, k_sum, v_sum ``[Ts, H, D]``; offsets int64 ``[B+1]``.
    Returns ``(out [T, H, D], out_sum [Ts, H, D])``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s_off = summary_offsets(offsets, chunk_size, summary_tokens)
    outs, outs_sum = [], []
    for b in range(offsets.numel() - 1):
        e0, e1 = int(offsets[b]), int(offsets[b + 1])
        s0, s1 = int(s_off[b]), int(s_off[b + 1])
        qq = torch.cat([q[e0:e1], q_sum[s0:s1]])
        kk = torch.cat([k[e0:e1], k_sum[s0:s1]])
        vv = torch.cat([v[e0:e1], v_sum[s0:s1]])
        mask = ksa_visibility(e1 - e0, chunk_size, window, summary_tokens, max_summaries, q.device, window_unit)
        scores = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        o = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vv)
        outs.append(o[: e1 - e0])
        outs_sum.append(o[e1 - e0:])
    empty = q.new_zeros((0, *q.shape[1:]))
    out = torch.cat(outs) if outs else empty
    out_sum = torch.cat(outs_sum) if outs_sum else q_sum.new_zeros((0, *q_sum.shape[1:]))
    return out, out_sum
