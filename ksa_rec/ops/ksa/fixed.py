"""The streaming step in fixed-capacity buffers: one new event per user, no host reads, so a CUDA graph can
capture it (``ksa_rec.modules.step_graphs``).

``step.py``'s caches are jagged and grow, so every step plans its rows on the host; that planning (~60 small
ops a layer) is what bounds the batch-1 latency of a GPU step (docs/results/serving.md). Here each user's
rows sit at a place their identity alone fixes, in one buffer a layer whose shape depends on the batch and
a capacity, never on the data:

- events: a ring of ``R`` rows, event ``i`` at row ``i % R``, where ``R`` covers every event a later query
  can read (``event_rows``); a full layer (``W = None``) keeps ``R = capacity`` rows, event ``i`` at row ``i``;
- summaries (layers whose events read them): summary ``r = c*S + j`` at row ``R + r % Rs`` (``summary_rows``);
- the step's own summary tokens, in ``S`` scratch rows after those.

Rows not written yet carry identity -1, which no query sees. Who sees what is the same rule as every other
backend's: the torch path makes ``KsaRule.visible`` the mask of one attention over the whole buffer (two batched
matmuls); the Triton path is the jagged step's decode kernel (``triton_cached.py``), which evaluates the rule's
intervals per key and reads each user's rows in use once. Either equals ``ksa_step_attention`` (and the training
op) to float tolerance; the tests compare them event by event.

Backends (``ksa_rec.ops.backend.resolve_backend``, form "step", as the jagged step): ``"triton"`` on CUDA by
default, ``"torch"`` elsewhere. The torch path builds masks and scores of ``[B, H, 1 + S', N]`` over every row,
used or not: on an H100, 10.5 ms a step for 1,024 users at 10K events (docs/results/serving.md), where reading
their 5.2 GB of K/V once would take ~1.6 ms at the card's nominal bandwidth. The kernel reads the rows in use
once and builds no mask.

A step's tokens per user: its new event (index ``position``), then, when the encoder carries summaries, the
S summary tokens of the event's chunk ``c = position // k``. They are computed at every step (shapes must
not depend on the data) and their K/V kept only when the event completes its chunk; before that their
query reads the chunk's events so far, so its output is finite and unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ksa_rec.ops.backend import resolve_backend
from ksa_rec.ops.ksa.cached import KeyRows, QueryRows
from ksa_rec.ops.ksa.rule import KsaRule

EMPTY = -1
"""Identity of a row not written yet: below every event index and summary id, so no query sees it."""


def event_rows(rule: KsaRule, capacity: int) -> int:
    """Rows a layer keeps for events: what the newest query can still read, whatever comes next (or
    ``capacity`` for a full layer). A chunk window reads the W chunks before its own (``(W+1)*k`` rows);
    with summaries, a summary query also reads its whole chunk."""
    if rule.window is None:
        return capacity
    span = (rule.window + 1) * rule.unit
    return max(span, rule.chunk_size) if rule.summary_tokens else span


def summary_rows(rule: KsaRule, capacity: int) -> int:
    """Rows a layer keeps for summaries: none when its events read none; one per slot of every chunk an event
    below ``capacity`` can be in when they read every older one; else the M chunks an event reads plus the W + 1
    newer ones not yet visible."""
    if not rule.events_see_summaries:
        return 0
    if rule.max_summaries is None:
        return -(-capacity // rule.chunk_size) * rule.summary_tokens
    return (rule.window + rule.max_summaries + 1) * rule.summary_tokens


ROW_ALIGN = 16
"""Rows a layer's buffers are rounded up to (aligned rows for the matmul kernels; the timings in
docs/results/serving.md were taken with it)."""


@dataclass
class FixedCache:
    """One layer's state for B users in fixed buffers: ``k, v [B, N, Hkv, Dh]`` with identities ``idx [B, N]``
    (int64, ``EMPTY`` where unwritten). Rows ``[0, R)`` hold events, ``[R, R + Rs)`` the summaries kept (``Rs``
    may be 0), the next ``S'`` the step's own summary tokens (scratch, rewritten every step), the rest padding.
    One buffer for every stream, so a step attends to it in one pass, with no concatenation; rows outermost, so
    ``k.view(B * N, Hkv, Dh)`` is the jagged rows the decode kernel reads."""

    k: Tensor
    v: Tensor
    idx: Tensor
    events: int
    """R: event rows."""
    kept: int
    """Rs: summary rows kept across steps (the step's own summary tokens follow them)."""
    wraps: bool
    """Event rows are a ring (``i % R``); False for a full layer (row ``i``, ``i < R``)."""
    summaries_wrap: bool
    """Kept summary rows are a ring (``r % Rs``, a bounded M); False when every summary is kept (row ``r``)."""

    @classmethod
    def empty(cls, rule: KsaRule, batch: int, capacity: int, heads: int, head_dim: int, dtype: torch.dtype,
              device) -> FixedCache:
        """``capacity``: more than the highest event index any user will reach in this state."""
        R, Rs, S = event_rows(rule, capacity), summary_rows(rule, capacity), rule.summary_tokens
        N = -(-(R + Rs + S) // ROW_ALIGN) * ROW_ALIGN
        k = torch.zeros(batch, N, heads, head_dim, dtype=dtype, device=device)
        return cls(k, torch.zeros_like(k), torch.full((batch, N), EMPTY, dtype=torch.int64, device=device), R, Rs,
                   rule.window is not None, rule.max_summaries is not None)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.idx))

    @property
    def is_summary(self) -> Tensor:
        """``[N]`` bool: which rows hold summaries."""
        return torch.arange(self.idx.shape[1], device=self.idx.device) >= self.events

    # ---- from and to the jagged caches' per-user rows (``LayerCache.user``), for storage ---------------------
    def load(self, b: int, user: dict[str, Tensor]) -> None:
        """Put user b's rows (``LayerCache.user(b)`` / ``GrowingCache.user(b)``) in their places. Rows no later
        query reads are dropped, as the jagged cache would; a row that does not fit raises."""
        self.idx[b] = EMPTY
        self._load(b, user["k"], user["v"], user["idx"], 0, self.events, self.wraps, "event")
        if self.kept:
            self._load(b, user["sk"], user["sv"], user["sidx"], self.events, self.kept, self.summaries_wrap, "summary")

    def _load(self, b: int, k: Tensor, v: Tensor, idx: Tensor, first: int, rows: int, wraps: bool, what: str) -> None:
        if not idx.numel():
            return
        keep = idx > idx.max() - rows if wraps else idx >= 0
        idx, k, v = idx[keep], k[keep], v[keep]
        if not wraps and int(idx.max()) >= rows:
            raise ValueError(f"fixed-capacity state: {what} {int(idx.max())} does not fit {rows} rows; pick a larger "
                             "capacity")
        at = first + (idx % rows if wraps else idx).to(self.idx.device)
        self.idx[b, at] = idx.to(self.idx.device)
        self.k[b, at] = k.to(self.k.device, self.k.dtype)
        self.v[b, at] = v.to(self.v.device, self.v.dtype)

    def user(self, b: int, first_event: int = 0, first_summary: int = 0) -> dict[str, Tensor]:
        """User b's rows in identity order, as ``LayerCache.user(b)`` gives them: events from index
        ``first_event`` and summaries from id ``first_summary`` on (the rule's ``first_kept_event`` /
        ``first_kept_summary``: a ring also holds rows no later query reads, which the jagged state drops)."""
        def rows(first, count, lowest):
            ids = self.idx[b, first:first + count]
            order = torch.argsort(ids)
            order = first + order[ids[order] >= max(lowest, 0)]
            return self.k[b, order], self.v[b, order], self.idx[b, order]

        k, v, idx = rows(0, self.events, first_event)
        sk, sv, sidx = rows(self.events, self.kept, first_summary)
        return {"k": k, "v": v, "idx": idx, "sk": sk, "sv": sv, "sidx": sidx}


def fixed_step_attention(q: Tensor, k: Tensor, v: Tensor, rule: KsaRule, cache: FixedCache, position: Tensor, *,
                         scale: float | None = None, backend: str | None = None) -> Tensor:
    """One new event per user against ``cache``, which is updated in place; no host reads.

    Args:
        q: ``[B, 1 + S', H, Dh]``: each user's new event (index ``position [B]``), then the S' summary tokens of
            its chunk ``c = position // k`` (S' = S with a summary stream, else 0). RoPE applied.
        k, v: ``[B, 1 + S', Hkv, Dh]``, the same rows.
        rule: the layer's ``KsaRule`` (``summary_tokens`` = S').
        cache: the layer's ``FixedCache``; the event's K/V are written (always) and the summaries' (when the
            event completes its chunk and the layer keeps summaries).
        backend: None (auto), ``"torch"`` or ``"triton"`` (module docstring).
    Returns:
        ``[B, 1 + S', H, Dh]``: the event's output, then the summaries' (meaningful when the chunk completed).
    """
    B, Q = q.shape[:2]
    S = Q - 1
    users = torch.arange(B, device=q.device)
    rows = position % cache.events if cache.wraps else position
    # The new event and this step's summary tokens first: the event's query reads itself, a summary its chunk's
    # earlier slots and events (the new one included).
    cache.k[users, rows] = k[:, 0].to(cache.k.dtype)
    cache.v[users, rows] = v[:, 0].to(cache.v.dtype)
    cache.idx[users, rows] = position
    chunk = torch.div(position, rule.chunk_size, rounding_mode="floor")
    sum_ids = chunk[:, None] * S + torch.arange(S, device=q.device)  # [B, S]
    if S:
        scratch = slice(cache.events + cache.kept, cache.events + cache.kept + S)
        cache.k[:, scratch] = k[:, 1:].to(cache.k.dtype)
        cache.v[:, scratch] = v[:, 1:].to(cache.v.dtype)
        cache.idx[:, scratch] = sum_ids
    q_ids = torch.cat([position[:, None], sum_ids], 1)  # [B, Q]
    if resolve_backend(backend, q.device, q.dtype, "step") == "triton":
        out = _attend_triton(q, q_ids, rule, cache, position, scale)
    else:
        out = _attend_torch(q, q_ids, rule, cache, scale)

    if S and cache.kept:  # after the attention: no event of this chunk reads its summaries
        complete = ((position + 1) % rule.chunk_size == 0)[:, None]  # [B, 1]
        at = (users[:, None], cache.events + (sum_ids % cache.kept if cache.summaries_wrap else sum_ids))
        keep = complete[:, :, None, None]
        cache.k[at] = torch.where(keep, k[:, 1:].to(cache.k.dtype), cache.k[at])
        cache.v[at] = torch.where(keep, v[:, 1:].to(cache.v.dtype), cache.v[at])
        cache.idx[at] = torch.where(complete, sum_ids, cache.idx[at])
    return out


def _attend_torch(q: Tensor, q_ids: Tensor, rule: KsaRule, cache: FixedCache, scale: float | None) -> Tensor:
    """``[B, Q, H, Dh]``: the rule as a ``[B, Q, N]`` mask over every row of the buffer, two batched matmuls."""
    B, Q, H, D = q.shape
    q_is_sum = torch.arange(Q, device=q.device) > 0
    seen = rule.visible(q_ids[:, :, None], q_is_sum[None, :, None], cache.idx[:, None, :],
                        cache.is_summary[None, None, :]) & (cache.idx[:, None, :] >= 0)  # [B, Q, N]
    Hkv = cache.k.shape[2]
    G = H // Hkv
    # [B, Hkv, G*Q, Dh]: query row (g, t) is head hkv*G + g at token t. Batched matmuls, not a fused attention
    # kernel: those parallelise over users, heads and query blocks only, and a step has 1 + S queries a user, so
    # one user's 100K keys would be read by 4 thread blocks (full*4 at 100K events, batch 1: 41.7 ms, against 1.0 ms
    # here; docs/results/serving.md).
    qh = q.view(B, Q, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Q, D)
    scale = D ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # the softmax in at least float32
    keys = cache.k.to(q.dtype).permute(0, 2, 3, 1)  # [B, Hkv, Dh, N]
    scores = torch.matmul(qh, keys).to(acc) * scale  # [B, Hkv, G*Q, N]
    scores = scores.view(B, Hkv, G, Q, -1).masked_fill(~seen[:, None, None], float("-inf"))
    probs = torch.softmax(scores.view(B, Hkv, G * Q, -1), -1).to(q.dtype)
    out = torch.matmul(probs, cache.v.to(q.dtype).transpose(1, 2))  # [B, Hkv, G*Q, Dh]
    return out.view(B, Hkv, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B, Q, H, D)


def _attend_triton(q: Tensor, q_ids: Tensor, rule: KsaRule, cache: FixedCache, position: Tensor,
                   scale: float | None) -> Tensor:
    """``[B, Q, H, Dh]``: the decode kernel over each user's rows in use, the buffer read as jagged rows (user b's
    events ``b*N + [0, min(position + 1, R))``, its summaries and scratch ``b*N + [R, R + Rs + S')``). It computes
    in the buffer's dtype (a bf16 state: q rounded to bf16, float32 accumulation)."""
    from ksa_rec.ops.ksa.triton_cached import ksa_cached_attention_triton

    B, Q, H, D = q.shape
    N, Hkv = cache.idx.shape[1], cache.k.shape[2]
    starts = torch.arange(B + 1, device=q.device) * N
    queries = QueryRows(torch.arange(B + 1, device=q.device) * Q, q_ids.reshape(-1),
                        (torch.arange(Q, device=q.device) > 0).repeat(B))
    k_rows, v_rows, idx = cache.k.view(B * N, Hkv, D), cache.v.view(B * N, Hkv, D), cache.idx.view(-1)
    events = KeyRows(starts, idx, k_rows, v_rows)
    summaries = KeyRows(starts + cache.events, idx, k_rows, v_rows)
    out = ksa_cached_attention_triton(
        q.reshape(B * Q, H, D).to(cache.k.dtype), queries, events, summaries, rule, scale=scale,
        event_ends=starts[:-1] + (position + 1).clamp(max=cache.events),
        summary_ends=starts[:-1] + cache.events + cache.kept + (Q - 1))
    return out.view(B, Q, H, D).to(q.dtype)


__all__ = ["EMPTY", "ROW_ALIGN", "FixedCache", "event_rows", "fixed_step_attention", "summary_rows"]
