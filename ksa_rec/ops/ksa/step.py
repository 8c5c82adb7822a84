"""The streaming step of KSA: a layer's cached K/V (its state) and the op that continues it with new tokens.

``ksa_step_attention(q, k, v, tokens, rule, state) -> (out, state)`` is the training op's streaming form
(state in the signature): the step's new tokens attend to the state plus themselves under the same
``KsaRule``, and the state keeps what later tokens can still see (``KsaRule.first_kept_*``).

Per-layer K/V kept for streaming, jagged over a batch of users (KSA.md section 7). Each cached row
carries its identity, so what a layer keeps follows from its rule and the attention never depends on
the order or the amount kept:

- event rows: K (RoPE applied) and V of past events, with their absolute event index;
- summary rows: K/V of summary tokens, with their summary id ``c*S + j``.

Example, k = 4, W = 1, one ksa layer, a user after 13 events (chunks 0, 1, 2 complete, event 12 open)::

    events kept    | e8 e9 e10 e11 e12 |      (chunk 3 - W = 2 onwards: the ring)
    summaries kept | s0 s1 s2         |      (all complete chunks; max_summaries bounds them)

A step's cost is host-side (many tiny ops), not bandwidth, so a step works out where rows go and which
survive once (``plan_step``) for all the layers whose caches hold the same rows, in the same index
tensors (``share_layouts``), under the same rule; each layer then only concatenates its K/V into one key
table and takes rows from it, as views where they are consecutive.

Two state types:

- ``LayerCache`` (ksa, sca, swa layers): packed rows; a step builds the next cache from the old rows that
  survive plus the new ones. Their caches are bounded (the ring and the summaries), so that copy is too.
- ``GrowingCache`` (full layers: ``window=None``, nothing ever dropped): each user's rows sit in a slot of
  a pool with spare rows, like a vector with doubling, so a step writes the new K/V into the spare rows
  in place instead of copying the whole history per layer (``plan_growth``). Same attention, same kept
  rows, same per-user tensors (``user(b)``) as a ``LayerCache`` would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from itertools import accumulate

import torch
from torch import Tensor

from ksa_rec.ops.backend import resolve_backend
from ksa_rec.ops.ksa.cached import (
    CachedPlan,
    KeyRows,
    QueryRows,
    Rows,
    attend_cached,
    attend_padded,
    ksa_cached_attention,
    plan_cached_attention,
)
from ksa_rec.ops.ksa.rule import KsaRule
from ksa_rec.utils.jagged import lengths_to_offsets, offsets_to_lengths, segment_ids


@dataclass
class LayerCache:
    """``k, v (sum_b m_b, Hkv, Dh)`` with ``idx [sum m_b]`` and ``offsets [B+1]``; ``sk, sv (sum_b s_b,
    Hkv, Dh)`` with ``sidx [sum s_b]`` and ``s_offsets [B+1]``."""

    k: Tensor
    v: Tensor
    idx: Tensor
    offsets: Tensor
    sk: Tensor
    sv: Tensor
    sidx: Tensor
    s_offsets: Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> "LayerCache":
        def rows():
            return torch.zeros(0, heads, head_dim, dtype=dtype, device=device)

        none = torch.zeros(0, dtype=torch.int64, device=device)
        zero = torch.zeros(batch + 1, dtype=torch.int64, device=device)
        return cls(rows(), rows(), none, zero, rows(), rows(), none.clone(), zero.clone())

    @property
    def layout(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The tensors that say which rows the cache holds (shared by the layers that hold the same rows)."""
        return self.idx, self.offsets, self.sidx, self.s_offsets

    def to(self, device, moved: dict | None = None) -> "LayerCache":
        """``moved``: tensors already moved, by id; pass one dict for several caches to keep shared
        tensors shared."""
        moved = {} if moved is None else moved
        out = []
        for f in fields(self):
            t = getattr(self, f.name)
            if id(t) not in moved:
                moved[id(t)] = (t, t.to(device))
            out.append(moved[id(t)][1])
        return LayerCache(*out)

    # ---- per-user (de)composition, for storage ---------------------------------------------------------
    def user(self, b: int) -> dict[str, Tensor]:
        e0, e1, s0, s1 = (int(x) for x in (self.offsets[b], self.offsets[b + 1], self.s_offsets[b],
                                           self.s_offsets[b + 1]))
        return {"k": self.k[e0:e1], "v": self.v[e0:e1], "idx": self.idx[e0:e1],
                "sk": self.sk[s0:s1], "sv": self.sv[s0:s1], "sidx": self.sidx[s0:s1]}

    @classmethod
    def stack(cls, users: list[dict[str, Tensor]]) -> "LayerCache":
        def cat(name):
            return torch.cat([u[name] for u in users])

        def offsets(name):
            return lengths_to_offsets(torch.tensor([u[name].shape[0] for u in users], dtype=torch.int64))

        device = users[0]["k"].device
        return cls(cat("k"), cat("v"), cat("idx"), offsets("idx").to(device), cat("sk"), cat("sv"), cat("sidx"),
                   offsets("sidx").to(device))

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.idx, self.sk, self.sv, self.sidx))


def share_layouts(caches: list) -> list:
    """The caches, where layers that hold the same rows now hold them in the same tensors: a step plans
    the rows once per layout, found by identity (``StepTokens.plan``). Other caches pass through."""
    distinct, grown, out = [], [], []
    for cache in caches:
        if isinstance(cache, GrowingCache):
            same = next((g for g in grown if g.slots.same_rows(cache.slots)), None)
            if same is None:
                grown.append(cache)
            else:
                cache = replace(cache, slots=same.slots)
        elif isinstance(cache, LayerCache):
            same = next((d for d in distinct if all(a.shape == b.shape and torch.equal(a, b)
                                                    for a, b in zip(cache.layout, d.layout))), None)
            if same is None:
                distinct.append(cache)
            else:
                cache = replace(cache, idx=same.idx, offsets=same.offsets, sidx=same.sidx, s_offsets=same.s_offsets)
        out.append(cache)
    return out


Selection = Tensor | slice
"""Row numbers into a step's key table: an index tensor, or a slice where they are consecutive."""


def take(table: Tensor, rows: Selection) -> Tensor:
    if isinstance(rows, slice):
        return table[rows]
    return table.index_select(0, rows) if rows.numel() else table.new_empty((0, *table.shape[1:]))


def join_rows(old_index: Tensor, old_offsets: Tensor, new_index: Tensor, new_offsets: Tensor,
              base: int = 0) -> tuple[Tensor, Tensor, Selection]:
    """Each user's old rows, then its new rows: ``(identities, offsets [B+1], rows)``, where ``rows`` are
    the rows of ``cat([old, new])`` in that order, plus ``base``."""
    n_old, n_new = old_index.numel(), new_index.numel()
    if not n_new:
        return old_index, old_offsets, slice(base, base + n_old)
    if not n_old:
        return new_index, new_offsets, slice(base, base + n_new)
    if old_offsets.numel() == 2:
        return torch.cat([old_index, new_index]), old_offsets + new_offsets, slice(base, base + n_old + n_new)
    offsets = old_offsets + new_offsets
    seg = segment_ids(offsets, n_old + n_new)
    local = torch.arange(n_old + n_new, device=offsets.device) - offsets[seg]
    old_len = (old_offsets[1:] - old_offsets[:-1])[seg]
    rows = torch.where(local < old_len, old_offsets[seg] + local, n_old + new_offsets[seg] + local - old_len)
    return torch.cat([old_index, new_index])[rows], offsets, rows + base if base else rows


@dataclass
class StreamRows:
    """One stream (events or summaries) of a batch of caches through a step: the rows the attention
    reads (old then new per user) and the rows that survive it, as rows of the step's key table."""

    index: Tensor
    offsets: Tensor
    rows: Selection
    kept_index: Tensor
    kept_offsets: Tensor
    kept_rows: Selection

    @classmethod
    def build(cls, old_index: Tensor, old_offsets: Tensor, new_index: Tensor, new_offsets: Tensor, base: int,
              keep: Tensor | bool) -> "StreamRows":
        """``keep``: True keeps every row, False none, a ``[B]`` tensor the rows whose identity is at least
        the user's entry."""
        index, offsets, rows = join_rows(old_index, old_offsets, new_index, new_offsets, base)
        if keep is True:
            return cls(index, offsets, rows, index, offsets, rows)
        if keep is False or not index.numel():
            none = index[:0]
            return cls(index, offsets, rows, none, torch.zeros_like(offsets), none)
        one_user = offsets.numel() == 2
        seg = None if one_user else segment_ids(offsets, index.numel())
        survive = torch.nonzero(index >= (keep if one_user else keep[seg])).squeeze(1)
        if one_user:
            kept_offsets = offsets.new_tensor([0, survive.numel()])
        else:  # survivors are in row order, so their owners are sorted
            kept_offsets = torch.searchsorted(seg[survive], torch.arange(offsets.numel(), device=offsets.device))
        kept_rows = _consecutive(survive, rows.start) if isinstance(rows, slice) else rows[survive]
        return cls(index, offsets, rows, index[survive], kept_offsets, kept_rows)


@dataclass
class CacheStep:
    """How a step changes a batch of caches, for every layer whose cache holds the same rows and keeps by
    the same rule (built once per step). Key table rows: old events, new events, old summaries, new
    summaries (``torch.cat([cache.k, k_new, cache.sk, k_sum_new])``)."""

    events: StreamRows
    summaries: StreamRows

    @classmethod
    def build(cls, cache: LayerCache, index: Tensor, offsets: Tensor, sum_index: Tensor, sum_offsets: Tensor,
              keep_events: Tensor | bool, keep_summaries: Tensor | bool) -> "CacheStep":
        """New event identities ``index`` / ``offsets [B+1]``, new summary ids ``sum_index`` /
        ``sum_offsets``; ``keep_*`` as in ``StreamRows.build``."""
        events = StreamRows.build(cache.idx, cache.offsets, index, offsets, 0, keep_events)
        base = cache.idx.numel() + index.numel()
        return cls(events, StreamRows.build(cache.sidx, cache.s_offsets, sum_index, sum_offsets, base, keep_summaries))

    def table_rows(self) -> Tensor:
        """The key table's rows in the order ``cat([events, summaries])`` of the attention's (appended) rows."""
        return torch.cat([_as_tensor(self.events.rows, self.events.index.device),
                          _as_tensor(self.summaries.rows, self.events.index.device)])

    def advance(self, keys: Tensor, values: Tensor) -> LayerCache:
        """The cache after the step, from the step's key table."""
        ev, sm = self.events, self.summaries
        return LayerCache(take(keys, ev.kept_rows), take(values, ev.kept_rows), ev.kept_index, ev.kept_offsets,
                          take(keys, sm.kept_rows), take(values, sm.kept_rows), sm.kept_index, sm.kept_offsets)


def _consecutive(rows: Tensor, base: int) -> Selection:
    """``rows + base``, as a slice where they are consecutive (the usual case: a user's oldest rows drop
    out), so the kept K/V are a view of the step's key table instead of a copy."""
    if rows.numel():
        first, last = rows[[0, -1]].tolist()
        if last - first + 1 == rows.numel():
            return slice(base + first, base + last + 1)
    return rows + base


def _as_tensor(rows: Selection, device) -> Tensor:
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows


@dataclass
class StepTokens:
    """New tokens of a streaming step for B users, built once per step and shared by every layer.

    The step's tokens are one stream: the new events, then the summary tokens of the chunks they complete.
    Events: ``offsets [B+1]``, absolute ``positions [Tn]``; summaries: ``sum_offsets [B+1]``, ``sum_ids
    [Tsn]`` (``c*S + j``). ``next_index [B]``: each user's event count after the step. ``queries``: the
    identities per user (its events, then its summaries); ``q_rows`` are their rows of the stream and
    ``stream_rows`` the inverse (both None: the same order). ``plans``: the per-step plans of the layers
    whose states hold the same rows and follow the same rule (``plan``).
    """

    offsets: Tensor
    positions: Tensor
    sum_offsets: Tensor
    sum_ids: Tensor
    next_index: Tensor
    queries: QueryRows
    q_rows: Tensor | None
    stream_rows: Tensor | None
    plans: dict = field(default_factory=dict)

    @classmethod
    def build(cls, offsets: Tensor, positions: Tensor, sum_offsets: Tensor, sum_ids: Tensor,
              next_index: Tensor) -> "StepTokens":
        q_index, q_offsets, rows = join_rows(positions, offsets, sum_ids, sum_offsets)
        n = positions.numel()
        if isinstance(rows, slice):
            q_rows = stream_rows = None
            q_is_summary = torch.arange(q_index.numel(), device=q_index.device) >= n
        else:
            q_rows, q_is_summary = rows, rows >= n
            stream_rows = torch.empty_like(rows)
            stream_rows[rows] = torch.arange(rows.numel(), device=rows.device)
        return cls(offsets, positions, sum_offsets, sum_ids, next_index, QueryRows(q_offsets, q_index, q_is_summary),
                   q_rows, stream_rows)

    @property
    def num_events(self) -> int:
        return self.positions.numel()

    def plan(self, rule: KsaRule, state: LayerCache, backend: str) -> StepPlan:
        """``plan_step`` for this step, built once for the layers with this rule, backend and state layout."""
        key = (rule, backend, *map(id, state.layout))
        if key not in self.plans:
            # The layout tensors stay referenced beside the plan, so no other tensor can take their ids.
            self.plans[key] = (state.layout, plan_step(self, rule, state, backend))
        return self.plans[key][1]

    def growth(self, rule: KsaRule, slots: Slots, backend: str, dtype: torch.dtype) -> GrowthPlan:
        """``plan_growth`` for this step, built once for the full layers whose caches share ``slots`` (it
        writes the new identities), with its attention built once per rule and backend."""
        key = ("grow", id(slots))
        if key not in self.plans:
            self.plans[key] = (slots, plan_growth(self, slots))
        attention_key = ("grow", id(slots), rule, backend)
        if attention_key not in self.plans:
            self.plans[attention_key] = (slots, plan_grown_attention(self, rule, self.plans[key][1], backend, dtype))
        return self.plans[attention_key][1]


@dataclass
class StepPlan:
    """What a step does to a batch of states under one rule: which rows it reads and keeps (``update``),
    and for the torch backend the padded attention problem (``attention``; None for Triton)."""

    update: CacheStep
    attention: CachedPlan | None


def plan_step(tokens: StepTokens, rule: KsaRule, state: LayerCache, backend: str) -> StepPlan:
    """Rows kept: events from ``rule.first_kept_event(next_index)``, summaries from
    ``rule.first_kept_summary(next_index)`` (none when events read no summaries). An unbounded window or
    summary range keeps every row without comparing identities."""
    if not rule.events_see_summaries:
        keep_summaries = False
    else:
        keep_summaries = True if rule.max_summaries is None else rule.first_kept_summary(tokens.next_index)
    keep_events = True if rule.window is None else rule.first_kept_event(tokens.next_index)
    update = CacheStep.build(state, tokens.positions, tokens.offsets, tokens.sum_ids, tokens.sum_offsets,
                             keep_events, keep_summaries)
    if backend != "torch" or not tokens.queries.index.numel():
        return StepPlan(update, None)
    ev, sm = update.events, update.summaries
    attention = plan_cached_attention(tokens.queries, Rows(ev.offsets, ev.index), Rows(sm.offsets, sm.index), rule,
                                      state.k.dtype)
    if attention.key_rows is None:  # one user: the key table and the stream are already its padded rows
        return StepPlan(update, attention)
    return StepPlan(update, replace(
        attention, key_rows=update.table_rows()[attention.key_rows],
        query_rows=attention.query_rows if tokens.q_rows is None else tokens.q_rows[attention.query_rows],
        out_rows=attention.out_rows if tokens.stream_rows is None else attention.out_rows[tokens.stream_rows]))


def ksa_step_attention(q: Tensor, k: Tensor, v: Tensor, tokens: StepTokens, rule: KsaRule, state: LayerCache, *,
                       backend: str | None = None, scale: float | None = None) -> tuple[Tensor, LayerCache]:
    """The step's tokens ``q [Tn + Tsn, H, D]``, ``k, v [Tn + Tsn, Hkv, D]`` (events then summaries, RoPE
    applied) against ``state`` -> ``(out [Tn + Tsn, H, D], the state after the step)``: the new K/V
    appended and what no later token can see dropped. Equal to the training op over whole histories.

    A ``GrowingCache`` state (full layers) is appended to in place (``plan_growth``): the state passed in
    keeps its own rows, but only the state a step returns can be continued without a copy."""
    backend = resolve_backend(backend, q.device, q.dtype, "step")
    if isinstance(state, GrowingCache):
        return _grow_step(q, k, v, tokens, rule, state, backend, scale)
    plan = tokens.plan(rule, state, backend)
    n = tokens.num_events
    keys = torch.cat([state.k, k[:n], state.sk, k[n:]])
    values = torch.cat([state.v, v[:n], state.sv, v[n:]])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not q.shape[0]:
        out = q
    elif plan.attention is not None:
        out = attend_cached(plan.attention, q, keys, values, scale)
    else:
        ev, sm = plan.update.events, plan.update.summaries
        out = ksa_cached_attention(q if tokens.q_rows is None else q[tokens.q_rows], tokens.queries,
                                   KeyRows(ev.offsets, ev.index, take(keys, ev.rows), take(values, ev.rows)),
                                   KeyRows(sm.offsets, sm.index, take(keys, sm.rows), take(values, sm.rows)),
                                   rule, scale=scale, backend=backend)
        out = out if tokens.stream_rows is None else out[tokens.stream_rows]
    return out, plan.update.advance(keys, values)


# ---- full layers: a cache that grows in place ------------------------------------------------------------
UNUSED = 2**31 - 1
"""Identity of a spare pool row: above any event index (and below the Triton kernel's 2**31 limit), so no
query ever sees it; its K/V are zeros, so a kernel that reads it adds exact zeros."""

MIN_CAPACITY = 16


def slot_capacity(lengths: Tensor) -> Tensor:
    """Slot rows for users holding ``lengths [B]`` rows (CPU int64): the smallest power of two above the
    length (at least ``MIN_CAPACITY``), so a slot always has a spare row and a full slot doubles."""
    return torch.tensor([_slot_rows(n) for n in lengths.tolist()], dtype=torch.int64)


def _slot_rows(length: int) -> int:
    """``slot_capacity`` of one user, on the host."""
    return max(MIN_CAPACITY, 1 << int(length).bit_length())


class _Tip:
    """The version of the newest ``Slots`` of one pool allocation: only that one may append in place."""

    __slots__ = ("version",)

    def __init__(self) -> None:
        self.version = 0


@dataclass(eq=False)
class Slots:
    """Where B users' rows sit in a pool, shared by the full layers that hold the same rows.

    User b owns pool rows ``[starts[b], starts[b+1])`` (its slot, ``capacity[b]`` rows, slots in user
    order with no gaps); its first ``lengths[b]`` rows are used, oldest first. Example, B = 2 users with 3
    and 1 rows in slots of 4::

        pool rows | a0 a1 a2 -- | b0 -- -- -- |      (-- spare: zeros, identity UNUSED)
        starts    | 0           4             8
        offsets   | 0        3    4                 (the used rows, packed: LayerCache's offsets)
    """

    index: Tensor
    """int64 ``[P]``: each pool row's event index (UNUSED in spare rows)."""
    offsets: Tensor
    """int64 ``[B+1]``: used rows, packed (on the pool's device)."""
    starts: Tensor
    """int64 ``[B+1]``: slot starts, ``starts[-1] = P`` (on the pool's device)."""
    lengths: Tensor
    """CPU int64 ``[B]``: used rows per user."""
    capacity: Tensor
    """CPU int64 ``[B]``: slot rows per user."""
    host_starts: list[int]
    """``starts`` on the host."""
    tip: _Tip
    version: int

    @property
    def is_tip(self) -> bool:
        return self.version == self.tip.version

    @classmethod
    def build(cls, index: Tensor, offsets: Tensor, lengths: Tensor, capacity: Tensor) -> "Slots":
        starts = lengths_to_offsets(capacity)
        return cls(index, offsets, starts.to(index.device), lengths, capacity, starts.tolist(), _Tip(), 0)

    def same_rows(self, other: "Slots") -> bool:
        return self is other or (self.index.device == other.index.device and torch.equal(self.capacity, other.capacity)
                                 and torch.equal(self.lengths, other.lengths) and torch.equal(self.index, other.index))

    def to(self, device) -> "Slots":
        index = self.index.to(device)
        if index is self.index:  # not moved: the same slots, still the only ones that may append
            return self
        return Slots(index, self.offsets.to(device), self.starts.to(device), self.lengths, self.capacity,
                     self.host_starts, _Tip(), 0)

    def used_rows(self, starts: list[int] | Tensor) -> Selection:
        """The pool rows of the used rows, packed order, in a pool whose slots start at ``starts``."""
        if self.lengths.numel() == 1:
            first = int(starts[0])
            return slice(first, first + int(self.lengths[0]))
        total = int(self.lengths.sum())
        seg = segment_ids(self.offsets, total)
        return starts[seg] + torch.arange(total, device=seg.device) - self.offsets[seg]


@dataclass(eq=False)
class GrowingCache:
    """A full layer's cache: pools ``k_pool, v_pool [P, Hkv, Dh]`` laid out by ``slots`` (``Slots``).

    A full layer never drops a row, so a step appends each user's new K/V in the spare rows of its slot,
    in place; when a slot is full, the pool is laid out again with that slot doubled (one copy of the used
    rows; a slot fills again only once its user's rows have doubled). Appending in place also needs the
    state to be the newest one of its pool (``Slots.is_tip``); stepping an older state copies first, so
    states a caller still holds never change. Everything a caller reads is the used rows: ``user(b)``,
    ``num_bytes``, and the ``LayerCache`` fields as properties (``k, v, idx, offsets`` packed, no summaries:
    a full layer's events read none).
    """

    k_pool: Tensor
    v_pool: Tensor
    slots: Slots

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> "GrowingCache":
        rows = torch.zeros(0, heads, head_dim, dtype=dtype, device=device)
        return cls.stack([{"k": rows, "v": rows, "idx": torch.zeros(0, dtype=torch.int64, device=device)}] * batch)

    @classmethod
    def stack(cls, users: list[dict[str, Tensor]]) -> "GrowingCache":
        """Per-user tensors (``user(b)``; any summary rows must be empty) -> one cache, each slot with spare
        rows (``slot_capacity``)."""
        if any(u["sidx"].numel() for u in users if "sidx" in u):
            raise ValueError("a full layer's cache keeps no summary rows")
        first = users[0]["k"]
        # Sizes on the host (Python ints): a serving micro-batch stacks a user or two, where tensor ops on
        # [B]-sized tensors cost more than the copies.
        lengths = [u["idx"].shape[0] for u in users]
        capacity = [_slot_rows(n) for n in lengths]
        starts = list(accumulate(capacity, initial=0))
        k_pool = torch.zeros(starts[-1], *first.shape[1:], dtype=first.dtype, device=first.device)
        v_pool = torch.zeros_like(k_pool)
        index = torch.full((starts[-1],), UNUSED, dtype=torch.int64, device=first.device)
        for b, u in enumerate(users):
            if lengths[b]:
                rows = slice(starts[b], starts[b] + lengths[b])
                index[rows], k_pool[rows], v_pool[rows] = u["idx"], u["k"], u["v"]
        offsets = torch.tensor(list(accumulate(lengths, initial=0)), dtype=torch.int64, device=first.device)
        slots = Slots(index, offsets, torch.tensor(starts, dtype=torch.int64, device=first.device),
                      torch.tensor(lengths, dtype=torch.int64), torch.tensor(capacity, dtype=torch.int64), starts,
                      _Tip(), 0)
        return cls(k_pool, v_pool, slots)

    # ---- the LayerCache view: the used rows -------------------------------------------------------------
    def user(self, b: int) -> dict[str, Tensor]:
        first = self.slots.host_starts[b]
        rows = slice(first, first + int(self.slots.lengths[b]))
        none = self.k_pool[:0]
        return {"k": self.k_pool[rows], "v": self.v_pool[rows], "idx": self.slots.index[rows], "sk": none,
                "sv": none, "sidx": self.slots.index[:0]}

    def packed(self) -> LayerCache:
        """The same rows as a ``LayerCache`` (a copy, except for one user)."""
        rows = self.slots.used_rows(self.slots.starts)
        none = self.k_pool[:0]
        return LayerCache(take(self.k_pool, rows), take(self.v_pool, rows), take(self.slots.index, rows),
                          self.slots.offsets, none, none, self.slots.index[:0],
                          torch.zeros_like(self.slots.offsets))

    @property
    def k(self) -> Tensor:
        return self.packed().k

    @property
    def v(self) -> Tensor:
        return self.packed().v

    @property
    def idx(self) -> Tensor:
        return take(self.slots.index, self.slots.used_rows(self.slots.starts))

    @property
    def offsets(self) -> Tensor:
        return self.slots.offsets

    @property
    def sk(self) -> Tensor:
        return self.k_pool[:0]

    @property
    def sv(self) -> Tensor:
        return self.v_pool[:0]

    @property
    def sidx(self) -> Tensor:
        return self.slots.index[:0]

    @property
    def s_offsets(self) -> Tensor:
        return torch.zeros_like(self.slots.offsets)

    @property
    def num_bytes(self) -> int:
        """Bytes of the used rows (what ``user(b)`` gives and a store keeps); spare rows not counted."""
        row = (self.k_pool[0].numel() * self.k_pool.element_size() + self.v_pool[0].numel() * self.v_pool.element_size()
               + self.slots.index.element_size()) if self.k_pool.shape[0] else 0
        return int(self.slots.lengths.sum()) * row

    @property
    def capacity_bytes(self) -> int:
        """Bytes the pools take, spare rows included."""
        return sum(t.numel() * t.element_size() for t in (self.k_pool, self.v_pool, self.slots.index))

    def to(self, device, moved: dict | None = None) -> "GrowingCache":
        """``moved``: as in ``LayerCache.to`` (layers sharing slots keep sharing them)."""
        moved = {} if moved is None else moved
        out = []
        for t, move in ((self.k_pool, lambda t: t.to(device)), (self.v_pool, lambda t: t.to(device)),
                        (self.slots, lambda s: s.to(device))):
            if id(t) not in moved:
                moved[id(t)] = (t, move(t))
            out.append(moved[id(t)][1])
        return GrowingCache(*out)


@dataclass
class GrowthPlan:
    """What a step does to the full layers whose caches share one ``Slots``: the slots after the step,
    whether the pools are laid out again first (``moved``: old pool rows -> new pool rows of the used rows,
    None when appending in place), the pool rows of the step's new events (``written``), and the
    attention (torch: the padded problem, its event columns as pool rows; Triton: None)."""

    slots: Slots
    moved: tuple[Selection, Selection] | None
    written: Selection
    attention: CachedPlan | None
    summary_rows: Tensor | None
    """``[B, Smax]`` rows of the step's new summaries per padded summary column (torch, several users)."""

    def apply(self, pool: Tensor, new: Tensor) -> Tensor:
        """This layer's pool after the step, with the step's new rows ``new [Tn, Hkv, Dh]`` written."""
        if self.moved is not None:
            src, dst = self.moved
            out = pool.new_zeros((self.slots.index.shape[0], *pool.shape[1:]))
            out[dst] = take(pool, src)
            pool = out
        if isinstance(self.written, slice):
            pool[self.written] = new
        elif new.shape[0]:
            pool.index_copy_(0, self.written, new)
        return pool


def plan_growth(tokens: StepTokens, slots: Slots) -> GrowthPlan:
    """The step's new events appended to each user's slot: in place when every slot has room and ``slots``
    is the newest of its pool; else the pool laid out again (slots that overflow get ``slot_capacity``
    rows, at least double). The new identities are written to the slots' index here, once for all layers
    (so once per step and slots, whatever the rules: ``StepTokens.growth``). One device sync (the new rows
    per user). No attention yet (``plan_grown_attention``)."""
    device = slots.index.device
    one_user = slots.lengths.numel() == 1
    new_lengths = offsets_to_lengths(tokens.offsets).cpu()
    lengths = slots.lengths + new_lengths
    in_place = slots.is_tip and bool((lengths <= slots.capacity).all())
    if in_place:
        capacity, index, tip, version, moved = slots.capacity, slots.index, slots.tip, slots.version + 1, None
        starts, host_starts = slots.starts, slots.host_starts
    else:
        capacity = torch.where(lengths > slots.capacity, slot_capacity(lengths), slots.capacity)
        host_starts = lengths_to_offsets(capacity).tolist()
        starts = torch.tensor(host_starts, dtype=torch.int64, device=device)
        tip, version = _Tip(), 0
        src, dst = slots.used_rows(slots.starts), slots.used_rows(host_starts if one_user else starts)
        moved = (src, dst)
        index = torch.full((host_starts[-1],), UNUSED, dtype=torch.int64, device=device)
        index[dst] = take(slots.index, src)
    n = tokens.num_events
    if one_user:  # its slot starts at pool row 0
        written: Selection = slice(int(slots.lengths[0]), int(lengths[0]))
        index[written] = tokens.positions
    else:
        seg = segment_ids(tokens.offsets, n)
        old_lengths = offsets_to_lengths(slots.offsets)
        written = starts[seg] + old_lengths[seg] + torch.arange(n, device=device) - tokens.offsets[seg]
        index.index_copy_(0, written, tokens.positions)
    tip.version = version
    after = Slots(index, slots.offsets + tokens.offsets, starts, lengths, capacity, host_starts, tip, version)
    return GrowthPlan(after, moved, written, None, None)


def plan_grown_attention(tokens: StepTokens, rule: KsaRule, growth: GrowthPlan, backend: str,
                         dtype: torch.dtype) -> GrowthPlan:
    """``growth`` with the attention of the step's queries under ``rule`` (a full layer's) against the
    grown slots: for torch, ``plan_cached_attention`` with each user's event columns read from its slot
    (pool rows) and its summary columns from the step's new summaries (``summary_rows``)."""
    if rule.window is not None or rule.events_see_summaries:
        raise ValueError(f"a GrowingCache holds a full layer's rows (window=None), not those of {rule}")
    if backend != "torch" or not tokens.queries.index.numel():
        return growth
    slots, summaries = growth.slots, Rows(tokens.sum_offsets, tokens.sum_ids)
    if slots.lengths.numel() == 1:  # one user: its slot's used rows are the padded problem
        attention = plan_cached_attention(tokens.queries, Rows(slots.offsets, slots.index[:growth.written.stop]),
                                          summaries, rule, dtype)
        return replace(growth, attention=attention)
    attention = plan_cached_attention(tokens.queries, Rows(slots.offsets, slots.index), summaries, rule, dtype,
                                      event_starts=slots.starts[:-1])
    width = attention.event_width
    summary_rows = (attention.key_rows[:, width:] - slots.index.numel()).clamp_(min=0)
    attention = replace(
        attention, key_rows=attention.key_rows[:, :width],
        query_rows=attention.query_rows if tokens.q_rows is None else tokens.q_rows[attention.query_rows],
        out_rows=attention.out_rows if tokens.stream_rows is None else attention.out_rows[tokens.stream_rows])
    return replace(growth, attention=attention, summary_rows=summary_rows)


def _grow_step(q: Tensor, k: Tensor, v: Tensor, tokens: StepTokens, rule: KsaRule, state: GrowingCache,
               backend: str, scale: float | None) -> tuple[Tensor, GrowingCache]:
    """``ksa_step_attention`` for a ``GrowingCache``: the new event K/V written into the pools, then the
    queries against each user's slot and the step's own summaries (never kept: a full layer's events read
    none). The torch path builds the same padded keys as the ``LayerCache`` path (padding columns may hold
    other finite rows; they are masked), so outputs are bitwise the same on CPU."""
    plan = tokens.growth(rule, state.slots, backend, q.dtype)
    n = tokens.num_events
    k_pool, v_pool = plan.apply(state.k_pool, k[:n]), plan.apply(state.v_pool, v[:n])
    after = GrowingCache(k_pool, v_pool, plan.slots)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not q.shape[0]:
        return q, after
    if plan.attention is not None:
        att = plan.attention
        if att.key_rows is None:  # one user: its slot's used rows, then the step's summaries
            used = plan.written.stop
            keys, values = k_pool[:used], v_pool[:used]
            if k.shape[0] > n:
                keys, values = torch.cat([keys, k[n:]]), torch.cat([values, v[n:]])
            keys, values = keys[None], values[None]
        else:
            keys, values = k_pool[att.key_rows], v_pool[att.key_rows]
            if plan.summary_rows.shape[1]:
                keys = torch.cat([keys, k[n:][plan.summary_rows]], dim=1)
                values = torch.cat([values, v[n:][plan.summary_rows]], dim=1)
        return attend_padded(att, q, keys, values, scale), after
    # Triton (or flex, whose step form is the torch op): the pools as they are, spare rows included (their
    # identity is never visible, their K/V are zeros), each user's keys its whole slot: no copy.
    slots = plan.slots
    out = ksa_cached_attention(q if tokens.q_rows is None else q[tokens.q_rows], tokens.queries,
                               KeyRows(slots.starts, slots.index, k_pool, v_pool),
                               KeyRows(tokens.sum_offsets, tokens.sum_ids, k[n:], v[n:]),
                               rule, scale=scale, backend=backend)
    return (out if tokens.stream_rows is None else out[tokens.stream_rows]), after
