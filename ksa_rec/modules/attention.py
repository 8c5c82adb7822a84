"""Attention layers: one class per kind, one protocol, one registry (``KINDS``).

Every kind implements ``AttentionLayer``:

- ``forward(h, layout)``: the training pass over a jagged batch (its events, then the summary stream when
  the encoder carries one, as one tensor) -> outputs before the residual;
- ``step(h, layout, state)``: the streaming pass over a step's new tokens (events, then summaries, the
  same way) against the layer's per-user state -> outputs and the new state (equal to ``forward`` over
  the whole histories);
- ``empty_state`` / ``stack_states``: the state type it keeps (``LayerCache`` for the kinds below, a
  ``GrowingCache`` appended in place for full layers, ``MkaState`` / ``FastMkaState`` for the memory
  kinds); every state has ``user(b)``, ``to(device)``, ``num_bytes`` and ``stack(users)``;
- ``report()``: scalars worth logging (the memory kinds' router weights).

The four attention kinds of KSA.md section 10 differ only in their ``KsaRule`` (``W`` = window in
chunks, ``k`` = chunk size, ``S`` = summary tokens, ``M`` = max summaries)::

    kind  events see                                   rule
    full  all earlier events                           KsaRule(k, None, S)
    ksa   own chunk + W chunks raw, older summaries    KsaRule(k, W, S, M)
    sca   own chunk + W chunks raw, nothing older      KsaRule(k, W, S, 0)
    swa   the W*k previous events                      KsaRule(k, W*k, S, 0, window_unit=1)

Besides them: the memory kinds ``mka`` / ``fastmka`` (MKA.md) and ``hstu`` (HSTU's pointwise attention over
every earlier event, ``ksa_rec.modules.hstu``), which carry no summary stream.

When the encoder carries a summary stream (any kind that reads summaries is in the pattern), every one
of these layers also moves the summaries forward with its own summary Q/K/V projections (KSA.md section
4): a summary reads its own chunk's events and its own chunk's earlier slots, whatever the layer kind.
Adding a kind means one class here and one row in ``KINDS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ksa_rec.modules.hstu import PointwiseUnit
from ksa_rec.modules.mka import FastMkaAttention, MkaAttention
from ksa_rec.ops.causal import causal_attention
from ksa_rec.ops.ksa import KsaRule, ksa_attention
from ksa_rec.ops.ksa.fixed import FixedCache, fixed_step_attention
from ksa_rec.ops.ksa.step import GrowingCache, LayerCache, StepTokens, ksa_step_attention
from ksa_rec.ops.rope import apply_rotary

if TYPE_CHECKING:
    from ksa_rec.modules.config import EncoderConfig


@dataclass
class StreamLayout:
    """Where the tokens of a jagged batch sit; shared by every layer of one forward pass.

    The stream is the ``T`` events (``offsets [B+1]``, absolute ``positions [T]``), then the summary tokens
    when the encoder carries them (``summary_index`` order); ``cos, sin [T + Ts, 1, Dh/2]`` are the rotary
    tables of the whole stream (a summary takes those of an event of its chunk).
    """

    offsets: Tensor
    max_len: int
    positions: Tensor
    cos: Tensor
    sin: Tensor
    op_tables: dict = field(default_factory=dict)
    """What the attention op may share between the layers of this pass (``ksa_attention``'s ``tables``)."""

    @property
    def num_events(self) -> int:
        return self.positions.numel()


@dataclass
class StepLayout:
    """New tokens of a streaming step (``StepTokens``: events, then the summary tokens of the chunks they
    complete) with the rotary tables ``cos, sin [Tn + Tsn, 1, Dh/2]`` of that stream, built once per step."""

    tokens: StepTokens
    cos: Tensor
    sin: Tensor
    with_summaries: bool


@dataclass
class FixedLayout:
    """A fixed-capacity step's tokens (``AttentionLayer.fixed_step``): one new event per user at ``position [B]``,
    then each user's ``summary_tokens`` summary tokens of that event's chunk (0 without a summary stream), with
    the rotary tables ``cos, sin [B + B*S, 1, Dh/2]`` of that stream."""

    position: Tensor
    summary_tokens: int
    cos: Tensor
    sin: Tensor


class AttentionLayer(nn.Module):
    """The protocol every attention kind implements (module docstring)."""

    kind: ClassVar[str]
    reads_summaries: ClassVar[bool] = False
    """Events read summary keys: a pattern with this kind makes the encoder carry a summary stream."""
    carries_summaries: ClassVar[bool] = True
    """The layer can move a summary stream forward (a pattern mixing a kind without this and one that
    reads summaries is refused)."""

    def forward(self, h: Tensor, layout: StreamLayout) -> Tensor:
        """The stream ``h [T + Ts, dim]`` (normed; Ts = 0 without summaries) -> outputs of that shape, before
        the residual."""
        raise NotImplementedError

    def step(self, h: Tensor, layout: StepLayout, state):
        """The step's tokens ``h [Tn + Tsn, dim]`` (normed) against ``state`` -> ``(outputs, new state)``."""
        raise NotImplementedError

    def empty_state(self, batch: int, dtype: torch.dtype, device):
        """The state of ``batch`` users with no events."""
        raise NotImplementedError

    def stack_states(self, users: list[dict[str, Tensor]]):
        """Per-user state tensors (``state.user(b)``) -> one batched state."""
        raise NotImplementedError

    def report(self) -> dict[str, Tensor]:
        """Scalars of the last forward worth logging, by name."""
        return {}

    has_fixed_step = False
    """Whether ``fixed_step`` / ``empty_fixed_state`` / ``unfixed_user`` exist for this kind."""

    @staticmethod
    def no_fixed_step(kinds: list[str]) -> str | None:
        """The one-line reason a pattern of ``kinds`` has no fixed-capacity step, or None when it has one."""
        missing = [kind for kind in kinds if not KINDS[kind].has_fixed_step]
        with_one = ", ".join(kind for kind, layer in KINDS.items() if layer.has_fixed_step)
        return f"{missing[0]} layers have no fixed-capacity step (kinds with one: {with_one})" if missing else None

    @property
    def _no_fixed_step(self) -> str:
        return self.no_fixed_step([self.kind])

    def fixed_step(self, h: Tensor, layout: FixedLayout, cache) -> Tensor:
        """``step`` for one new event per user in fixed-capacity buffers (``ksa_rec.ops.ksa.fixed``): ``h [B +
        B*S', dim]`` (normed; events, then each user's S' summary tokens) -> outputs, the cache updated in place."""
        raise NotImplementedError(self._no_fixed_step)

    def empty_fixed_state(self, batch: int, capacity: int, dtype: torch.dtype, device):
        """The fixed-capacity state of ``batch`` users with no events, for histories up to ``capacity``."""
        raise NotImplementedError(self._no_fixed_step)

    def unfixed_user(self, cache, b: int, event_count: int) -> dict[str, Tensor]:
        """User b's state in ``cache`` (an ``empty_fixed_state``) as ``stack_states`` takes it."""
        raise NotImplementedError(self._no_fixed_step)


class RuleAttention(AttentionLayer):
    """Multi-head attention whose kind is a ``KsaRule``; event and summary streams have their own Q/K/V."""

    has_fixed_step = True

    def __init__(self, cfg: EncoderConfig, with_summaries: bool):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.with_summaries = with_summaries
        # The summary stream's projection (EncoderConfig.summary_qkv): its own; None (qkv's); or a correction
        # added to qkv's weight, starting at zero
        self.qkv_sum = (nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
                        if with_summaries and cfg.summary_qkv != "shared" else None)
        if self.qkv_sum is not None and cfg.summary_qkv == "delta":
            nn.init.zeros_(self.qkv_sum.weight)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def rule(self, with_summaries: bool) -> KsaRule:
        """What this kind sees; ``with_summaries=False``: the same events with no summary stream (S = 0)."""
        raise NotImplementedError

    def _summary_tokens(self, with_summaries: bool) -> int:
        return self.cfg.summary_tokens if with_summaries else 0

    def rotate(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``qkv [N, 3*dim]`` -> q, k, v ``[N, H, Dh]``; q and k rotated in one call (half the ops)."""
        qkv = qkv.view(qkv.shape[0], 3, self.num_heads, self.cfg.dim // self.num_heads)
        q, k = apply_rotary(qkv[:, :2], cos[:, None], sin[:, None]).unbind(1)
        return q, k, qkv[:, 2]

    def project(self, h: Tensor, num_events: int, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A stream ``h [N, dim]`` (its first ``num_events`` rows events, the rest summaries) -> rotated q, k, v
        ``[N, H, Dh]``: each stream through its projection (``EncoderConfig.summary_qkv``), then both rotated at
        once."""
        if h.shape[0] == num_events or self.qkv_sum is None:
            return self.rotate(self.qkv(h), cos, sin)
        # split, not two slices: its backward is one concatenation, where each slice's is a zero-filled copy
        events, summaries = h.split([num_events, h.shape[0] - num_events])
        weight = self.qkv_sum.weight
        if self.cfg.summary_qkv == "delta":  # the events' projection plus the summaries' correction
            weight = weight + self.qkv.weight
        return self.rotate(torch.cat([self.qkv(events), nn.functional.linear(summaries, weight)]), cos, sin)

    def forward(self, h: Tensor, layout: StreamLayout) -> Tensor:
        n = layout.num_events
        q, k, v = self.project(h, n, layout.cos, layout.sin)
        if h.shape[0] == n:
            return self.out(self.attend_events(q, k, v, layout).flatten(1))
        sizes = [n, h.shape[0] - n]
        (q, q_sum), (k, k_sum), (v, v_sum) = q.split(sizes), k.split(sizes), v.split(sizes)
        out, out_sum = ksa_attention(q, k, v, q_sum, k_sum, v_sum, layout.offsets, self.rule(True),
                                     backend=self.cfg.attention_backend, check_offsets=False,
                                     tables=layout.op_tables)
        return self.out(torch.cat([out, out_sum]).flatten(1))

    def attend_events(self, q: Tensor, k: Tensor, v: Tensor, layout: StreamLayout) -> Tensor:
        """Events only (no summary stream): the rule with S = 0."""
        none = q.new_zeros((0, *q.shape[1:]))
        return ksa_attention(q, k, v, none, none, none, layout.offsets, self.rule(False),
                             backend=self.cfg.attention_backend, check_offsets=False, tables=layout.op_tables)[0]

    def step(self, h: Tensor, layout: StepLayout, state: LayerCache | GrowingCache
             ) -> tuple[Tensor, LayerCache | GrowingCache]:
        q, k, v = self.project(h, layout.tokens.num_events, layout.cos, layout.sin)
        out, state = ksa_step_attention(q, k, v, layout.tokens, self.rule(layout.with_summaries), state,
                                        backend=self.cfg.attention_backend)
        return self.out(out.flatten(1)), state

    def empty_state(self, batch: int, dtype: torch.dtype, device) -> LayerCache:
        return LayerCache.empty(batch, self.num_heads, self.cfg.dim // self.num_heads, dtype, device)

    def stack_states(self, users: list[dict[str, Tensor]]) -> LayerCache:
        return LayerCache.stack(users)

    def fixed_step(self, h: Tensor, layout: FixedLayout, cache: FixedCache) -> Tensor:
        B, S = layout.position.shape[0], layout.summary_tokens
        q, k, v = self.project(h, B, layout.cos, layout.sin)

        def per_user(x: Tensor) -> Tensor:  # [B + B*S, H, Dh] -> [B, 1 + S, H, Dh]: event, then summaries
            return torch.cat([x[:B, None], x[B:].view(B, S, *x.shape[1:])], 1) if S else x[:, None]

        out = fixed_step_attention(per_user(q), per_user(k), per_user(v), self.rule(S > 0), cache,
                                   layout.position, backend=self.cfg.attention_backend)
        out = torch.cat([out[:, 0], out[:, 1:].flatten(0, 1)]) if S else out[:, 0]
        return self.out(out.flatten(1))

    def unfixed_user(self, cache: FixedCache, b: int, event_count: int) -> dict[str, Tensor]:
        """User b's rows of ``cache`` after ``event_count`` events, as the jagged state keeps them (no row that no
        later query reads)."""
        rule = self.rule(self.with_summaries)
        return cache.user(b, rule.first_kept_event(event_count), rule.first_kept_summary(event_count) or 0)

    def empty_fixed_state(self, batch: int, capacity: int, dtype: torch.dtype, device) -> FixedCache:
        return FixedCache.empty(self.rule(self.with_summaries), batch, capacity, self.num_heads,
                                self.cfg.dim // self.num_heads, dtype, device)


class FullAttention(RuleAttention):
    """Every earlier event: the state only grows, so it is a ``GrowingCache`` (new K/V appended in place)."""

    kind = "full"

    def rule(self, with_summaries: bool) -> KsaRule:
        return KsaRule(self.cfg.chunk_size, None, self._summary_tokens(with_summaries))

    def empty_state(self, batch: int, dtype: torch.dtype, device) -> GrowingCache:
        return GrowingCache.empty(batch, self.num_heads, self.cfg.dim // self.num_heads, dtype, device)

    def stack_states(self, users: list[dict[str, Tensor]]) -> GrowingCache:
        return GrowingCache.stack(users)

    def attend_events(self, q: Tensor, k: Tensor, v: Tensor, layout: StreamLayout) -> Tensor:
        # Plain causal attention: fused dense or varlen kernels beat any masked form of the same rule
        # (``resolve_full_path`` picks which).
        return causal_attention(q, k, v, layout.offsets, max_len=layout.max_len, check_offsets=False,
                                backend=self.cfg.attention_backend, tables=layout.op_tables)


class KsaAttention(RuleAttention):
    kind = "ksa"
    reads_summaries = True

    def rule(self, with_summaries: bool) -> KsaRule:
        cfg = self.cfg
        return KsaRule(cfg.chunk_size, cfg.window, self._summary_tokens(with_summaries), cfg.max_summaries)


class ScaAttention(RuleAttention):
    kind = "sca"

    def rule(self, with_summaries: bool) -> KsaRule:
        cfg = self.cfg
        return KsaRule(cfg.chunk_size, cfg.window, self._summary_tokens(with_summaries), 0)


class SwaAttention(RuleAttention):
    kind = "swa"

    def rule(self, with_summaries: bool) -> KsaRule:
        cfg = self.cfg
        return KsaRule(cfg.chunk_size, cfg.window * cfg.chunk_size, self._summary_tokens(with_summaries), 0,
                       window_unit=1)


class MemoryAttention(AttentionLayer):
    """The memory kinds (MKA.md; ``ksa_rec.modules.mka``): fixed-size per-user states, no summary stream."""

    carries_summaries = False
    memory_class: ClassVar[type]

    def __init__(self, cfg: EncoderConfig, with_summaries: bool):
        super().__init__()
        if with_summaries:
            raise ValueError(f"{self.kind} layers cannot carry a summary stream")
        self.memory = self.memory_class(cfg.dim, cfg.num_heads, cfg.mka)

    def forward(self, h: Tensor, layout: StreamLayout) -> Tensor:
        return self.memory(h, layout.offsets, layout.positions, layout.cos, layout.sin, check_inputs=False,
                           max_len=layout.max_len)

    def step(self, h: Tensor, layout: StepLayout, state):
        tokens = layout.tokens
        return self.memory.step(h, tokens.offsets, tokens.positions, layout.cos, layout.sin, state,
                                check_inputs=False)

    def empty_state(self, batch: int, dtype: torch.dtype, device):
        return self.memory.init_state(batch, device, dtype)

    def stack_states(self, users: list[dict[str, Tensor]]):
        return self.memory.state_class.stack(users)

    def report(self) -> dict[str, Tensor]:
        mean = self.memory.last_router_mean
        if mean is None:
            return {}
        return {f"router/{level}": mean[j] for j, level in enumerate(("local", "session", "long"))}


class MkaLayer(MemoryAttention):
    kind = "mka"
    memory_class = MkaAttention


class FastMkaLayer(MemoryAttention):
    kind = "fastmka"
    memory_class = FastMkaAttention


class HstuLayer(AttentionLayer):
    """HSTU's pointwise attention unit (``ksa_rec.modules.hstu``): every earlier event, no softmax, a learned
    bias per distance, the output gated; its state is every earlier event's K/V. No summary stream."""

    kind = "hstu"
    carries_summaries = False

    def __init__(self, cfg: EncoderConfig, with_summaries: bool):
        super().__init__()
        if with_summaries:
            raise ValueError("hstu layers cannot carry a summary stream")
        self.cfg = cfg
        self.unit = PointwiseUnit(cfg.dim, cfg.num_heads, cfg.hstu)

    def forward(self, h: Tensor, layout: StreamLayout) -> Tensor:
        return self.unit(h, layout.offsets, layout.positions, layout.max_len)

    def step(self, h: Tensor, layout: StepLayout, state: LayerCache) -> tuple[Tensor, LayerCache]:
        return self.unit.step(h, layout.tokens.offsets, layout.tokens.positions, state)

    def empty_state(self, batch: int, dtype: torch.dtype, device) -> LayerCache:
        return LayerCache.empty(batch, self.cfg.num_heads, self.cfg.dim // self.cfg.num_heads, dtype, device)

    def stack_states(self, users: list[dict[str, Tensor]]) -> LayerCache:
        return LayerCache.stack(users)


KINDS: dict[str, type[AttentionLayer]] = {
    cls.kind: cls for cls in (FullAttention, KsaAttention, ScaAttention, SwaAttention, MkaLayer, FastMkaLayer,
                              HstuLayer)}
"""Attention kinds by the name a pattern uses (``--model.encoder.pattern``)."""

__all__ = ["KINDS", "AttentionLayer", "FixedLayout", "RuleAttention", "StepLayout", "StreamLayout"]
