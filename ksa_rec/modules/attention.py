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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ksa_rec.models.config import EncoderConfig
from ksa_rec.modules.rope import apply_rotary
from ksa_rec.modules.kv_cache import LayerCache
from ksa_rec.modules.mka import FastMkaAttention, MkaAttention
from ksa_rec.ops.causal import causal_attention
from ksa_rec.ops.ksa import ksa_attention
from ksa_rec.ops.ksa.cached import ksa_cached_attention
from ksa_rec.ops.swa import sliding_window_attention
from ksa_rec.utils.jagged import jagged_append, segment_ids


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
    """New tokens of a streaming step for B users (see ``SequenceEncoder.step``).

    Events: ``offsets [B+1]``, absolute ``positions [Tn]``, rotary ``cos, sin``; summaries of the chunks
    these events complete: ``sum_offsets [B+1]``, ``sum_ids [Tsn]`` (``c*S + j``), ``sum_cos, sum_sin``.
    ``next_index [B]``: each user's event count after the step (what the caches are trimmed for).
    """

    offsets: Tensor
    positions: Tensor
    cos: Tensor
    sin: Tensor
    sum_offsets: Tensor
    sum_ids: Tensor
    sum_cos: Tensor
    sum_sin: Tensor
    next_index: Tensor


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
        proj = self.qkv_sum if summary else self.qkv
        q, k, v = proj(x).view(x.shape[0], 3, self.num_heads, self.cfg.dim // self.num_heads).unbind(1)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

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

    def step(self, h: Tensor, hs: Tensor | None, sl: StepLayout, cache: LayerCache) -> tuple[Tensor, Tensor | None, LayerCache]:
        """New tokens ``h [Tn, dim]`` / ``hs [Tsn, dim]`` (normed) against the cache; returns outputs (before
        the residual) and the cache with the new K/V added and what no later token can see dropped."""
        cfg = self.cfg
        q, k, v = self.project(h, sl.cos, sl.sin)
        if hs is None:
            qs = ks = vs = q[:0]
        else:
            qs, ks, vs = self.project(hs, sl.sum_cos, sl.sum_sin, summary=True)
        cache = cache.append(k, v, sl.positions, sl.offsets, ks, vs, sl.sum_ids, sl.sum_offsets)
        queries, q_offsets = jagged_append(q, sl.offsets, qs, sl.sum_offsets)
        q_index, _ = jagged_append(sl.positions, sl.offsets, sl.sum_ids, sl.sum_offsets)
        is_summary, _ = jagged_append(torch.zeros_like(sl.positions, dtype=torch.bool), sl.offsets,
                                      torch.ones_like(sl.sum_ids, dtype=torch.bool), sl.sum_offsets)
        out = ksa_cached_attention(queries, q_offsets, q_index, is_summary, cache.k, cache.v, cache.offsets,
                                   cache.idx, cache.sk, cache.sv, cache.s_offsets, cache.sidx,
                                   chunk_size=cfg.chunk_size, summary_tokens=cfg.summary_tokens if hs is not None else 0,
                                   **self.cached_rule())
        out_events = self.out(out[~is_summary].flatten(1))
        out_sum = None if hs is None else self.out(out[is_summary].flatten(1))
        return out_events, out_sum, self.trim(cache, sl.next_index, with_summaries=hs is not None)

    def trim(self, cache: LayerCache, next_index: Tensor, with_summaries: bool) -> LayerCache:
        """Drop the rows no future token of the user can see (``next_index [B]``: the next event's index).

        Future event i >= n sees events j >= (c(n) - W) * k (ksa/sca), j >= n - w (swa), all (full); a
        summary query needs its own chunk's events, so the open chunk is always kept with summaries. Future
        events see summaries of chunks >= c(n) - W - M (ksa only).
        """
        cfg, k = self.cfg, self.cfg.chunk_size
        n = next_index
        open_chunk = (n // k) * k
        if self.kind == "full":
            lo = torch.zeros_like(n)
        elif self.kind == "swa":
            lo = n - cfg.window * k
            lo = torch.minimum(lo, open_chunk) if with_summaries else lo
        else:
            lo = (n // k - cfg.window) * k
        event_keep = cache.idx >= lo[segment_ids(cache.offsets, cache.idx.numel())]
        if self.kind == "ksa" and with_summaries:
            first_chunk = n // k - cfg.window - (cfg.max_summaries if cfg.max_summaries is not None else n)
            owner_first = first_chunk[segment_ids(cache.s_offsets, cache.sidx.numel())]
            summary_keep = cache.sidx // cfg.summary_tokens >= owner_first
        else:
            summary_keep = torch.zeros_like(cache.sidx, dtype=torch.bool)
        return cache.keep(event_keep, summary_keep)


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
