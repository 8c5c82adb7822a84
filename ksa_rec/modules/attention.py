"""One attention layer whose kind (full / ksa / sca / swa) is fixed at construction.

All kinds share the event projections, RoPE and output projection, so a pattern string can mix them
freely. When the encoder carries a summary stream (any ``ksa`` layer in the pattern), every layer also
moves the summaries forward with its own summary Q/K/V projections (KSA.md section 4): a summary reads
its own chunk's events and its own chunk's earlier slots, whatever the layer kind.

How each kind maps onto the ops (``W`` = window in chunks, ``k`` = chunk size)::

    kind  events see                                   op
    full  all earlier events                           causal_attention, or ksa_attention(window=None)
    ksa   own chunk + W chunks raw, older summaries    ksa_attention(window=W)
    sca   own chunk + W chunks raw, nothing older      ksa_attention(window=W, max_summaries=0)
    swa   the W*k previous events                      sliding_window_attention
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ksa_rec.models.config import EncoderConfig
from ksa_rec.modules.rope import apply_rotary
from ksa_rec.modules.kv_cache import CacheStep, LayerCache, join_rows, take
from ksa_rec.modules.mka import FastMkaAttention, MkaAttention
from ksa_rec.ops.causal import causal_attention
from ksa_rec.ops.ksa import ksa_attention
from ksa_rec.ops.ksa.cached import (CachedPlan, attend_cached, ksa_cached_attention, plan_cached_attention,
                                    resolve_backend)
from ksa_rec.ops.swa import sliding_window_attention


@dataclass
class StreamLayout:
    """Where the tokens of a jagged batch sit; shared by every layer of one forward pass.

    ``offsets [B+1]`` and rotary tables ``cos, sin [T, 1, Dh/2]`` for events; the ``sum_*`` fields
    describe the summary stream (``None`` when the encoder has none).
    """

    offsets: Tensor
    max_len: int
    positions: Tensor
    cos: Tensor
    sin: Tensor
    sum_cos: Tensor | None = None
    sum_sin: Tensor | None = None


@dataclass
class StepLayout:
    """New tokens of a streaming step for B users (see ``SequenceEncoder.step``), built once per step.

    The step's tokens are one stream: the new events, then the summary tokens of the chunks they complete.
    Events: ``offsets [B+1]``, absolute ``positions [Tn]``; summaries: ``sum_offsets [B+1]``, ``sum_ids
    [Tsn]`` (``c*S + j``); rotary ``cos, sin [Tn + Tsn, 1, Dh/2]`` of the whole stream.
    ``next_index [B]``: each user's event count after the step (what the caches are trimmed for).
    Queries per user (its events, then its summaries): ``q_index``, ``q_is_summary``, ``q_offsets``;
    ``q_rows`` are their rows of the stream and ``stream_rows`` the inverse (both None: the same order).
    ``plans``: what the layers whose caches hold the same rows share within the step.
    """

    offsets: Tensor
    positions: Tensor
    sum_offsets: Tensor
    sum_ids: Tensor
    cos: Tensor
    sin: Tensor
    next_index: Tensor
    with_summaries: bool
    q_index: Tensor
    q_is_summary: Tensor
    q_offsets: Tensor
    q_rows: Tensor | None
    stream_rows: Tensor | None
    plans: dict = field(default_factory=dict)

    @classmethod
    def build(cls, offsets: Tensor, positions: Tensor, sum_offsets: Tensor, sum_ids: Tensor, cos: Tensor,
              sin: Tensor, next_index: Tensor, with_summaries: bool) -> "StepLayout":
        q_index, q_offsets, rows = join_rows(positions, offsets, sum_ids, sum_offsets)
        n = positions.numel()
        if isinstance(rows, slice):
            q_rows = stream_rows = None
            q_is_summary = torch.arange(q_index.numel(), device=q_index.device) >= n
        else:
            q_rows, q_is_summary = rows, rows >= n
            stream_rows = torch.empty_like(rows)
            stream_rows[rows] = torch.arange(rows.numel(), device=rows.device)
        return cls(offsets, positions, sum_offsets, sum_ids, cos, sin, next_index, with_summaries, q_index,
                   q_is_summary, q_offsets, q_rows, stream_rows)

    @property
    def num_events(self) -> int:
        return self.positions.numel()


class KindAttention(nn.Module):
    """Multi-head attention of one kind over the event stream (and the summary stream if present)."""

    def __init__(self, kind: str, cfg: EncoderConfig, with_summaries: bool):
        super().__init__()
        self.kind = kind
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.qkv_sum = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False) if with_summaries else None
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor, summary: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``x [N, dim]`` -> q, k, v ``[N, H, Dh]`` with RoPE applied to q and k."""
        return self.rotate((self.qkv_sum if summary else self.qkv)(x), cos, sin)

    def rotate(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``qkv [N, 3*dim]`` -> q, k, v ``[N, H, Dh]``; q and k rotated in one call (half the ops)."""
        qkv = qkv.view(qkv.shape[0], 3, self.num_heads, self.cfg.dim // self.num_heads)
        q, k = apply_rotary(qkv[:, :2], cos[:, None], sin[:, None]).unbind(1)
        return q, k, qkv[:, 2]

    def forward(self, x: Tensor, xs: Tensor | None, layout: StreamLayout) -> tuple[Tensor, Tensor | None]:
        """``x [T, dim]``, ``xs [Ts, dim]`` or None -> outputs of the same shapes (before the residual)."""
        q, k, v = self.project(x, layout.cos, layout.sin)
        if xs is None:
            out, out_sum = self.attend_events_only(q, k, v, layout), None
        else:
            qs, ks, vs = self.project(xs, layout.sum_cos, layout.sum_sin, summary=True)
            out, out_sum = self.attend_with_summaries(q, k, v, qs, ks, vs, layout)
            out_sum = self.out(out_sum.flatten(1))
        return self.out(out.flatten(1)), out_sum

    def attend_events_only(self, q: Tensor, k: Tensor, v: Tensor, layout: StreamLayout) -> Tensor:
        cfg = self.cfg
        if self.kind == "full":
            return causal_attention(q, k, v, layout.offsets, max_len=layout.max_len, check_offsets=False)
        if self.kind == "swa":
            return sliding_window_attention(q, k, v, layout.offsets, window_tokens=cfg.window * cfg.chunk_size,
                                            backend=cfg.attention_backend, check_offsets=False)
        if self.kind == "sca":
            none = q.new_zeros((0, *q.shape[1:]))
            return ksa_attention(q, k, v, none, none, none, layout.offsets, chunk_size=cfg.chunk_size,
                                 window=cfg.window, summary_tokens=0, backend=cfg.attention_backend,
                                 check_offsets=False)[0]
        raise ValueError(f"attention kind {self.kind!r} needs the summary stream")

    def attend_with_summaries(self, q, k, v, qs, ks, vs, layout: StreamLayout) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        window, max_summaries = {
            "ksa": (cfg.window, cfg.max_summaries),
            "full": (None, None),
            "sca": (cfg.window, 0),
            # swa events come from the token-window op; this call only moves the summaries forward.
            "swa": (0, 0),
        }[self.kind]
        out, out_sum = ksa_attention(q, k, v, qs, ks, vs, layout.offsets, chunk_size=cfg.chunk_size,
                                     window=window, summary_tokens=cfg.summary_tokens,
                                     max_summaries=max_summaries, backend=cfg.attention_backend,
                                     check_offsets=False)
        if self.kind == "swa":
            out = self.attend_events_only(q, k, v, layout)
        return out, out_sum

    # ---- streaming ---------------------------------------------------------------------------------------
    def empty_cache(self, batch: int, dtype: torch.dtype, device) -> LayerCache:
        return LayerCache.empty(batch, self.num_heads, self.cfg.dim // self.num_heads, dtype, device)

    @staticmethod
    def stack_cache(users: list[dict[str, Tensor]]) -> LayerCache:
        return LayerCache.stack(users)

    def cached_rule(self) -> dict:
        """Keyword arguments of ``ksa_cached_attention`` that express this layer's kind."""
        cfg = self.cfg
        return {
            "full": dict(window=None),
            "ksa": dict(window=cfg.window, max_summaries=cfg.max_summaries),
            "sca": dict(window=cfg.window, max_summaries=0),
            "swa": dict(window=None, window_tokens=cfg.window * cfg.chunk_size),
        }[self.kind]

    def step(self, h: Tensor, sl: StepLayout, cache: LayerCache) -> tuple[Tensor, LayerCache]:
        """The step's tokens ``h [Tn + Tsn, dim]`` (normed; ``StepLayout``) against the cache -> their outputs
        (before the residual) and the cache with the new K/V added and what no later token can see dropped."""
        n = sl.num_events
        qkv = self.qkv(h) if h.shape[0] == n else torch.cat([self.qkv(h[:n]), self.qkv_sum(h[n:])])
        q, k, v = self.rotate(qkv, sl.cos, sl.sin)
        update, attention = self.step_plan(sl, cache, q)
        keys = torch.cat([cache.k, k[:n], cache.sk, k[n:]])
        values = torch.cat([cache.v, v[:n], cache.sv, v[n:]])
        if not q.shape[0]:
            out = q
        elif attention is not None:
            out = attend_cached(attention, q, keys, values, q.shape[-1] ** -0.5)
        else:
            ev, sm = update.events, update.summaries
            out = ksa_cached_attention(q if sl.q_rows is None else q[sl.q_rows], sl.q_offsets, sl.q_index,
                                       sl.q_is_summary, take(keys, ev.rows), take(values, ev.rows), ev.offsets,
                                       ev.index, take(keys, sm.rows), take(values, sm.rows), sm.offsets, sm.index,
                                       chunk_size=self.cfg.chunk_size, summary_tokens=self.step_summary_tokens(sl),
                                       backend="triton", **self.cached_rule())
            out = out if sl.stream_rows is None else out[sl.stream_rows]
        return self.out(out.flatten(1)), update.advance(keys, values)

    def step_summary_tokens(self, sl: StepLayout) -> int:
        return self.cfg.summary_tokens if sl.with_summaries else 0

    def step_plan(self, sl: StepLayout, cache: LayerCache, q: Tensor) -> tuple[CacheStep, CachedPlan | None]:
        """Which key rows the step reads and keeps, and the torch attention's padded problem (None for the
        triton kernel); built once per step for the layers of this kind whose caches hold the same rows in
        the same tensors (``SequenceEncoder.stack_caches`` and ``step`` return caches that share them)."""
        key = (self.kind, *map(id, cache.layout))
        if key not in sl.plans:
            # The layout tensors stay referenced beside the plan, so no other tensor can take their ids.
            sl.plans[key] = (cache.layout, self.build_step_plan(sl, cache, q))
        return sl.plans[key][1]

    def build_step_plan(self, sl: StepLayout, cache: LayerCache, q: Tensor) -> tuple[CacheStep, CachedPlan | None]:
        """Kept rows: future event i >= n sees events j >= (c(n) - W) * k (ksa/sca), j >= n - w (swa), all
        (full); a summary query needs its own chunk's events, so the open chunk is always kept with
        summaries. Future events see summaries of chunks >= c(n) - W - M (ksa only; all of them when M is
        None). The other kinds read summaries only for the step's own summary queries."""
        cfg, k = self.cfg, self.cfg.chunk_size
        n = sl.next_index
        if self.kind == "full":
            keep_events = True
        elif self.kind == "swa":
            keep_events = n - cfg.window * k
            keep_events = torch.minimum(keep_events, (n // k) * k) if sl.with_summaries else keep_events
        else:
            keep_events = (n // k - cfg.window) * k
        keep_summaries = self.kind == "ksa" and sl.with_summaries
        if keep_summaries and cfg.max_summaries is not None:
            keep_summaries = (n // k - cfg.window - cfg.max_summaries) * cfg.summary_tokens
        update = CacheStep.build(cache, sl.positions, sl.offsets, sl.sum_ids, sl.sum_offsets, keep_events,
                                 keep_summaries)
        if not q.shape[0] or resolve_backend(None, q) != "torch":
            return update, None
        ev, sm = update.events, update.summaries
        attention = plan_cached_attention(sl.q_offsets, sl.q_index, sl.q_is_summary, ev.offsets, ev.index,
                                          sm.offsets, sm.index, chunk_size=k,
                                          summary_tokens=self.step_summary_tokens(sl), dtype=q.dtype,
                                          **self.cached_rule())
        if attention.key_rows is None:  # one user: the key table and the stream are already its padded rows
            return update, attention
        return update, replace(
            attention, key_rows=update.table_rows()[attention.key_rows],
            query_rows=attention.query_rows if sl.q_rows is None else sl.q_rows[attention.query_rows],
            out_rows=attention.out_rows if sl.stream_rows is None else attention.out_rows[sl.stream_rows])


class MemoryCache:
    """An ``MkaState`` / ``FastMkaState`` behind the per-user interface of ``LayerCache``."""

    def __init__(self, state):
        self.state = state

    def to(self, device) -> "MemoryCache":
        return MemoryCache(type(self.state)(**{k: v.to(device) for k, v in self.state.to_tensors().items()}))

    def user(self, b: int) -> dict[str, Tensor]:
        return self.state.select(torch.tensor([b])).to_tensors()

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.to_tensors().values())


class MemoryAttention(nn.Module):
    """The ``mka`` / ``fastmka`` kinds (``ksa_rec.modules.mka``, MKA.md) behind the encoder's layer
    interface. They carry no summary stream (the config refuses them next to ``ksa`` layers)."""

    def __init__(self, kind: str, cfg: EncoderConfig):
        super().__init__()
        self.kind = kind
        layer = MkaAttention if kind == "mka" else FastMkaAttention
        self.memory = layer(cfg.dim, cfg.num_heads, cfg.mka)

    @property
    def last_router_mean(self) -> Tensor | None:
        return self.memory.last_router_mean

    def forward(self, x: Tensor, xs: Tensor | None, layout: StreamLayout) -> tuple[Tensor, None]:
        return self.memory(x, layout.offsets, layout.positions, layout.cos, layout.sin, check_inputs=False), None

    def step(self, h: Tensor, hs: Tensor | None, sl: StepLayout, cache: MemoryCache) -> tuple[Tensor, None, MemoryCache]:
        out, state = self.memory.step(h, sl.offsets, sl.positions, sl.cos, sl.sin, cache.state, check_inputs=False)
        return out, None, MemoryCache(state)

    def empty_cache(self, batch: int, dtype: torch.dtype, device) -> MemoryCache:
        return MemoryCache(self.memory.init_state(batch, device, dtype))

    def stack_cache(self, users: list[dict[str, Tensor]]) -> MemoryCache:
        kind = type(self.memory.init_state(1, "cpu", torch.float32))
        return MemoryCache(kind.cat([kind.from_tensors(u) for u in users]))
