"""KSA attention of new tokens against cached keys: the serving (step / decode) form of the op.

Training sees whole histories; serving sees a few new tokens per user and the K/V that user's state
kept. Every token carries its identity, so the ``KsaRule`` (``rule.py``) is applied by index, whatever
the cache kept or in which order:

- an event query is its absolute event index ``i``; a summary query is its summary id ``c*S + j``;
- cached event keys carry their absolute event index, cached summary keys their summary id.

Layout: per user b, queries ``q[queries.offsets[b]:queries.offsets[b+1]]``, event keys
``events.k[events.offsets[b]:...]`` and summary keys ``summaries.k[summaries.offsets[b]:...]``; all
jagged, ``[rows, heads, D]``. The caller appends the new tokens' own K/V to the cache before calling (a
token sees itself); ``step.py`` does that for a streaming step.

Backends (``ksa_rec.ops.backend.resolve_backend``, form "step"): ``"torch"`` (this file: padded SDPA with
the rule's mask, the reference) and ``"triton"`` (``triton_cached.py``: one fused launch for the batch,
memory-bound streaming of each user's cache, imported lazily).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.ops.backend import resolve_backend
from ksa_rec.ops.ksa.rule import KsaRule
from ksa_rec.utils.jagged import offsets_to_lengths, segment_ids


@dataclass(frozen=True)
class Rows:
    """Identities of jagged rows: ``offsets [B+1]`` and ``index [rows]`` (event index or summary id)."""

    offsets: Tensor
    index: Tensor


@dataclass(frozen=True)
class QueryRows(Rows):
    """Query identities plus ``is_summary`` bool ``[rows]`` (a summary query's index is its summary id)."""

    is_summary: Tensor


@dataclass(frozen=True)
class KeyRows(Rows):
    """One stream of cached keys: identities plus ``k, v [rows, Hkv, D]`` (RoPE already applied to k)."""

    k: Tensor
    v: Tensor


def ksa_cached_attention(q: Tensor, queries: QueryRows, events: KeyRows, summaries: KeyRows, rule: KsaRule, *,
                         scale: float | None = None, backend: str | None = None) -> Tensor:
    """Attention of ``q (sum_b Q_b, H, D)`` to each user's cached event and summary keys under ``rule``.

    ``backend``: None (auto), ``"torch"`` or ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``);
    ``"flex"`` runs the torch path (flex has no cached form). Returns ``(sum_b Q_b, H, D)``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 0 or events.k.shape[0] + summaries.k.shape[0] == 0:
        return q.new_zeros(q.shape)
    if resolve_backend(backend, q.device, q.dtype, "step") == "triton":
        from ksa_rec.ops.ksa.triton_cached import ksa_cached_attention_triton

        return ksa_cached_attention_triton(q, queries, events, summaries, rule, scale=scale)
    plan = plan_cached_attention(queries, events, summaries, rule, q.dtype)
    return attend_cached(plan, q, torch.cat([events.k, summaries.k]), torch.cat([events.v, summaries.v]), scale)


@dataclass
class CachedPlan:
    """The torch path's padded problem: it depends on the layout and the identities only, so the layers
    of a stack whose states keep the same rows share one (``step.StepTokens.plan``).

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
    event_width: int | None = None
    """Kmax: the first columns of ``key_rows`` that hold event keys (None with one user)."""


def plan_cached_attention(queries: QueryRows, events: Rows, summaries: Rows, rule: KsaRule,
                          dtype: torch.dtype, event_starts: Tensor | None = None) -> CachedPlan:
    """``CachedPlan`` of ``ksa_cached_attention``'s torch path (identities only, no K/V; ``dtype``: the
    queries').

    ``event_starts [B]`` (more than one user): user b's event rows are ``events.index[event_starts[b]:]``,
    as many as ``events.offsets`` gives it, in a table that may hold other rows between users (a growing
    cache's pool, ``step.GrowingCache``); None: packed at ``events.offsets[:-1]``.

    Needs at least one query and one key. More than one user costs one device sync (the longest rows)."""
    q_offsets, q_index, q_is_summary = queries.offsets, queries.index, queries.is_summary
    k_offsets, k_index, s_offsets, s_index = events.offsets, events.index, summaries.offsets, summaries.index
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
        first = k_offsets[:-1] if event_starts is None else event_starts
        start = torch.where(is_event_col, first[:, None], k_index.numel() + s_offsets[:-1, None] - kmax)
        valid = width < torch.where(is_event_col, k_len[:, None], kmax + s_len[:, None])
        key_rows = torch.where(valid, start + width, 0)
        key_index = torch.where(valid, torch.cat([k_index, s_index])[key_rows], big)
        ki, si = key_index[:, :kmax], key_index[:, kmax:]
        qi, qs = q_index[query_rows], q_is_summary[query_rows]
        seg = segment_ids(q_offsets, q_index.numel())
        out_rows = seg * qmax + torch.arange(q_index.numel(), device=seg.device) - q_offsets[seg]
    key_index = torch.cat([ki, si], dim=1)[:, None, :]
    key_is_summary = (torch.arange(key_index.shape[-1], device=key_index.device) >= ki.shape[1])[None, None, :]
    mask = rule.visible(qi[:, :, None], qs[:, :, None], key_index, key_is_summary)
    # A query that sees nothing gets one key so the softmax stays finite (padding rows are dropped).
    mask[:, :, 0] |= ~mask.any(dim=2)
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return CachedPlan(query_rows, key_rows, out_rows, additive[:, None], None if key_rows is None else kmax)


def attend_cached(plan: CachedPlan, q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """``q [sum Q_b, H, D]`` against the key table ``keys, values [rows, Hkv, D]`` -> ``[sum Q_b, H, D]``."""
    def padded(x):
        return x[None] if plan.key_rows is None else x[plan.key_rows]

    return attend_padded(plan, q, padded(keys), padded(values), scale)


def attend_padded(plan: CachedPlan, q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """``q [sum Q_b, H, D]`` against keys already in the plan's padded layout ``keys, values [B, Kmax +
    Smax, Hkv, D]`` -> ``[sum Q_b, H, D]``."""
    qp = (q[None] if plan.query_rows is None else q[plan.query_rows]).transpose(1, 2)
    kp, vp = keys.transpose(1, 2), values.transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=plan.mask, scale=scale,
                                         enable_gqa=kp.shape[1] != qp.shape[1]).transpose(1, 2)
    return out[0] if plan.out_rows is None else out.flatten(0, 1)[plan.out_rows]


__all__ = ["CachedPlan", "KeyRows", "QueryRows", "Rows", "attend_cached", "attend_padded", "ksa_cached_attention",
           "plan_cached_attention"]
