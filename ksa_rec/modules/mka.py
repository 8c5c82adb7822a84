"""MKA and FastMKA attention layers (MKA.md), their config and their per-user streaming state.

Both layers take the pre-normed layer input of a jagged batch and return the output after their output
projection, like the other attention layers (``ksa_rec.modules.attention``)::

    x (sum_b n_b, dim) | offsets [B+1] | positions (sum_b n_b,) | cos, sin (sum_b n_b, 1, head_dim/2)

``forward`` is the parallel training path (``ksa_rec.ops.mka.reference``); ``step`` continues each
user's fixed-size state with a jagged batch of new events (``ksa_rec.ops.mka.streaming``). Feeding a
history through ``step`` in any pieces equals one ``forward`` over it, to float tolerance. The math and
every choice the spec leaves open are in ``ksa_rec/ops/mka/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ksa_rec.ops.mka.reference import (
    LEVELS,
    bank_attention,
    ema_scan,
    fastmka_sources,
    fuse_sources,
    level_weights,
    local_attention,
    mix_levels,
    mka_session,
    session_attention,
    session_summary,
)
from ksa_rec.ops.mka.streaming import (
    bank_attention_cached,
    bank_slots,
    bank_update,
    block_running_mean_cached,
    ring_index,
    ring_write,
    take_last,
    window_attention_cached,
)
from ksa_rec.ops.rope import apply_rotary
from ksa_rec.ops.swa import BACKENDS as WINDOW_BACKENDS
from ksa_rec.utils.jagged import (
    jagged_to_padded,
    lengths_to_offsets,
    offsets_to_lengths,
    positions_in_segment,
    segment_ids,
    validate_offsets,
)

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------

@dataclass
class MkaConfig:
    """MKA / FastMKA settings (MKA.md; defaults are ksa_rec's choices there)."""

    local_window: int = 128
    """W1: events the L1 level sees, the event itself included."""
    session_slots: int = 4
    """S2: normalised EMA slots per head (L2)."""
    decay_init: tuple[float, ...] = (0.5, 0.8, 0.95, 0.99)
    """Initial EMA decays, one per slot, in (0, 1); learned as ``sigmoid(theta)``."""
    block_size: int = 32
    """C3: events per L3 block, by absolute index."""
    max_blocks: int = 256
    """M3: newest visible blocks kept in the bank (0 disables L3)."""
    router_hidden_ratio: float = 0.5
    """Router hidden width = ``max(1, round(dim * ratio))``."""
    router_init: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Initial routing weights (L1, L2, L3): the router's last bias is ``log(router_init)``, its weight 0."""
    fast_window: int | None = 128
    """FastMKA: events its single causal attention sees, itself included (None = unbounded, no step)."""
    mask_empty_bank: bool = True
    """True: while no block is visible, route over L1 and L2 only; False: L3 contributes 0 with its weight."""
    scan_chunk: int = 64
    """Steps per chunk of the L2 chunked scan (speed only)."""
    step_piece: int = 64
    """Most new events per user that ``step`` processes together; sizes the bank (speed/memory only)."""
    window_backend: str | None = None
    """Backend of the windowed attention (``sliding_window_attention``): None (auto) or one of its BACKENDS."""

    def __post_init__(self) -> None:
        # YAML and checkpoint dicts give lists; keep tuples so the config stays hashable and comparable.
        self.decay_init = tuple(float(d) for d in self.decay_init)
        self.router_init = tuple(float(r) for r in self.router_init)
        _require_int("local_window", self.local_window, 1)
        _require_int("session_slots", self.session_slots, 1)
        _require_int("block_size", self.block_size, 1)
        _require_int("max_blocks", self.max_blocks, 0)
        _require_int("scan_chunk", self.scan_chunk, 1)
        _require_int("step_piece", self.step_piece, 1)
        if self.fast_window is not None:
            _require_int("fast_window", self.fast_window, 1)
        _require(len(self.decay_init) == self.session_slots and all(0.0 < d < 1.0 for d in self.decay_init),
                 "decay_init", f"needs session_slots ({self.session_slots}) values in (0, 1), got {self.decay_init}")
        _require(self.router_hidden_ratio > 0, "router_hidden_ratio", f"must be > 0, got {self.router_hidden_ratio}")
        _require(len(self.router_init) == LEVELS and all(r > 0 for r in self.router_init), "router_init",
                 f"needs {LEVELS} positive weights (L1, L2, L3), got {self.router_init}")
        _require(isinstance(self.mask_empty_bank, bool), "mask_empty_bank",
                 f"must be a bool, got {self.mask_empty_bank!r}")
        _require(self.window_backend is None or self.window_backend in WINDOW_BACKENDS, "window_backend",
                 f"must be null or one of {WINDOW_BACKENDS}, got {self.window_backend!r}")


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"mka.{name}: {problem}")


def _require_int(name: str, value, minimum: int) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, name,
             f"must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------

@dataclass
class _UserState:
    """Batched per-user tensors, leading dim B, fixed size per user. Subclasses declare ``SHAPES``:
    field name -> symbolic dims, each symbol must take one size across fields (checked on construction).
    ``start`` (first absolute position seen) and ``count`` (events seen) are int64 ``[B]``; ``INT_FIELDS``
    are int64, the others share one floating dtype."""

    start: Tensor
    count: Tensor

    SHAPES: ClassVar[dict[str, tuple[str, ...]]] = {"start": ("B",), "count": ("B",)}
    INT_FIELDS: ClassVar[tuple[str, ...]] = ("start", "count")

    def __post_init__(self) -> None:
        self._check()

    @property
    def batch(self) -> int:
        return self.start.shape[0]

    def select(self, index: Tensor) -> _UserState:
        """The users ``index`` (int64 ids or a bool mask over B), in that order."""
        return type(self)(**{name: getattr(self, name)[index] for name in self.SHAPES})

    @staticmethod
    def cat(states: list[_UserState]) -> _UserState:
        """Concatenate the users of states of one type (and one layer config)."""
        if not states:
            raise ValueError("state cat: needs at least one state")
        kind = type(states[0])
        if any(type(s) is not kind for s in states):
            raise ValueError(f"state cat: all states must be {kind.__name__}")
        return kind(**{name: torch.cat([getattr(s, name) for s in states]) for name in kind.SHAPES})

    def to_tensors(self) -> dict[str, Tensor]:
        """Field name -> contiguous tensor (safetensors-ready)."""
        return {name: getattr(self, name).contiguous() for name in self.SHAPES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> _UserState:
        """Inverse of ``to_tensors``; raises ``ValueError`` naming a missing, unknown or misshaped tensor."""
        missing, unknown = set(cls.SHAPES) - set(tensors), set(tensors) - set(cls.SHAPES)
        if missing or unknown:
            raise ValueError(f"{cls.__name__}.from_tensors: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(**{name: tensors[name] for name in cls.SHAPES})

    def _check(self) -> None:
        name_of = type(self).__name__
        sizes: dict[str, int] = {}
        float_dtype = None
        for name, dims in self.SHAPES.items():
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != len(dims):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name_of}.{name}: expected a tensor of shape {list(dims)}, got {shape}")
            for dim, size in zip(dims, value.shape):
                if sizes.setdefault(dim, size) != size:
                    raise ValueError(f"{name_of}.{name}: dim {dim} is {size}, but {sizes[dim]} in an earlier field "
                                     f"(shape {tuple(value.shape)} for {list(dims)})")
            if name in self.INT_FIELDS:
                wanted = torch.int64
            elif float_dtype is None and value.is_floating_point():
                wanted = float_dtype = value.dtype  # the first float field sets the dtype of the others
            else:
                wanted = float_dtype or "a floating dtype"
            if value.dtype != wanted:
                raise ValueError(f"{name_of}.{name}: dtype {value.dtype}, expected {wanted}")
            if value.device != self.start.device:
                raise ValueError(f"{name_of}.{name}: on {value.device}, but start is on {self.start.device}")

    # ---- the state protocol of the encoder's layers (``ksa_rec.modules.attention``) -------------------
    def user(self, b: int) -> dict[str, Tensor]:
        """User b's tensors (leading dim 1), for storage."""
        return self.select(torch.tensor([b], device=self.start.device)).to_tensors()

    @classmethod
    def stack(cls, users: list[dict[str, Tensor]]) -> _UserState:
        """Inverse of ``user`` over a batch of users."""
        return cls.cat([cls.from_tensors(u) for u in users])

    def to(self, device, moved: dict | None = None) -> _UserState:
        """On ``device`` (``moved`` is accepted for the protocol; no tensor here is shared with another state)."""
        return type(self)(**{name: getattr(self, name).to(device) for name in self.SHAPES})

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-user shapes of the fields (without B)."""
        return {name: tuple(getattr(self, name).shape[1:]) for name in self.SHAPES}

    def nbytes_per_user(self) -> int:
        """Bytes one user's state takes (all fields)."""
        return sum(math.prod(getattr(self, n).shape[1:]) * getattr(self, n).element_size() for n in self.SHAPES)


@dataclass
class MkaState(_UserState):
    """Per-user MKA state of one layer (``E = 2 * head_dim``: key then value halves).

    ``ring_kv [B, W1, H, E]``: rotated key and value of event p at slot ``p % W1``;
    ``ema_num [B, H, S2, E]``, ``ema_den [B, H, S2]``: the L2 numerators and denominators;
    ``bank_sum [B, N, H, E]``, ``bank_count [B, N]``: key/value sums and event count of block g at slot
    ``g % N`` (the open block included), ``N = bank_slots(...)``.
    """

    ring_kv: Tensor
    ema_num: Tensor
    ema_den: Tensor
    bank_sum: Tensor
    bank_count: Tensor

    SHAPES: ClassVar[dict[str, tuple[str, ...]]] = {
        "start": ("B",), "count": ("B",), "ring_kv": ("B", "W1", "H", "E"), "ema_num": ("B", "H", "S2", "E"),
        "ema_den": ("B", "H", "S2"), "bank_sum": ("B", "N", "H", "E"), "bank_count": ("B", "N"),
    }
    INT_FIELDS: ClassVar[tuple[str, ...]] = ("start", "count", "bank_count")


@dataclass
class FastMkaState(_UserState):
    """Per-user FastMKA state of one layer.

    ``ring_kv [B, Wf, H, 2*head_dim]``: the fused (rotated) key and value of event p at slot ``p % Wf``;
    ``ema_num [B, S2, dim]``, ``ema_den [B, S2]``: the L2 EMAs of x; ``block_sum [B, dim]``,
    ``block_count [B]``: x summed over the open block (the block of the user's last event).
    """

    ring_kv: Tensor
    ema_num: Tensor
    ema_den: Tensor
    block_sum: Tensor
    block_count: Tensor

    SHAPES: ClassVar[dict[str, tuple[str, ...]]] = {
        "start": ("B",), "count": ("B",), "ring_kv": ("B", "Wf", "H", "E"), "ema_num": ("B", "S2", "C"),
        "ema_den": ("B", "S2"), "block_sum": ("B", "C"), "block_count": ("B",),
    }
    INT_FIELDS: ClassVar[tuple[str, ...]] = ("start", "count", "block_count")


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------

def build_router(dim: int, cfg: MkaConfig) -> nn.Sequential:
    """``Linear(dim, hidden) -> SiLU -> Linear(hidden, 3)``, shared by heads.

    The last layer starts at weight 0 and bias ``log(router_init)``, so every token starts exactly at
    the prior (random weights of the default scale would swamp a bias of ~1).
    """
    hidden = max(1, round(dim * cfg.router_hidden_ratio))
    last = nn.Linear(hidden, LEVELS)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(cfg.router_init).log())
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), last)


def decay_logits(cfg: MkaConfig, *lead: int) -> nn.Parameter:
    """theta ``[*lead, S2]`` with ``sigmoid(theta) = decay_init`` (each leading index its own decays)."""
    decay = torch.tensor(cfg.decay_init, dtype=torch.float32)
    return nn.Parameter((decay.log() - torch.log1p(-decay)).expand(*lead, -1).clone())


class _MkaLayerBase(nn.Module):
    """What MKA and FastMKA share: router, decays, input checks and the piece loop of ``step``."""

    def __init__(self, dim: int, num_heads: int, cfg: MkaConfig):
        super().__init__()
        if num_heads < 1 or dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"{type(self).__name__}: dim ({dim}) must split into num_heads ({num_heads}) "
                             "heads of even size (RoPE rotates pairs)")
        self.dim, self.num_heads, self.head_dim, self.cfg = dim, num_heads, dim // num_heads, cfg
        self.scale = self.head_dim ** -0.5
        self.router = build_router(dim, cfg)
        self.out = nn.Linear(dim, dim, bias=False)
        self.last_router_mean: Tensor | None = None

    def log_decay(self) -> Tensor:
        """``log beta = logsigmoid(theta)``, the shape of ``decay_logit``."""
        return F.logsigmoid(self.decay_logit)

    def forward(self, x: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, *,
                check_inputs: bool = True, max_len: int | None = None) -> Tensor:
        """``x (sum_b n_b, dim)`` pre-normed -> ``(sum_b n_b, dim)`` after the output projection.

        ``check_inputs=False`` skips validating offsets and positions (device syncs), for an encoder that
        validated the batch once; with ``max_len`` (its longest user, at least) too, the pass reads nothing
        back to the host, so a CUDA graph can capture it.
        """
        if check_inputs:
            self.check_inputs(x, offsets, positions, cos, sin)
        if x.shape[0] == 0:
            self._record_router(x.new_zeros(0, LEVELS))
            return x.new_zeros(0, self.dim)
        if max_len is None:
            max_len = int(offsets_to_lengths(offsets).max())
        mixed, weights = self._mix(x, offsets, positions, cos, sin, max_len)
        self._record_router(weights)
        return self.out(mixed)

    def _mix(self, x: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
             max_len: int) -> tuple[Tensor, Tensor]:
        """The kind's attention before the output projection: ``(sum_b n_b, dim)`` and the routing
        weights ``(sum_b n_b, 3)``."""
        raise NotImplementedError

    def _record_router(self, weights: Tensor) -> None:
        self.last_router_mean = weights.detach().mean(0) if weights.shape[0] else None

    # -- input checks --------------------------------------------------------------------------------

    def check_inputs(self, x: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> None:
        """One-line ``ValueError`` unless shapes agree and each user's positions are consecutive ``>= 0``."""
        name = type(self).__name__
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name}: x must be (sum_b n_b, {self.dim}), got {tuple(x.shape)}")
        total = x.shape[0]
        validate_offsets(offsets, total)
        if positions.shape != (total,) or positions.dtype != torch.int64:
            raise ValueError(f"{name}: positions must be int64 of shape ({total},), got "
                             f"{positions.dtype} {tuple(positions.shape)}")
        for table_name, table in (("cos", cos), ("sin", sin)):
            if table.shape != (total, 1, self.head_dim // 2):
                raise ValueError(f"{name}: {table_name} must be ({total}, 1, {self.head_dim // 2}), got "
                                 f"{tuple(table.shape)}")
        if total and bool((positions < 0).any()):
            raise ValueError(f"{name}: positions must be >= 0")
        if total and bool((positions - _first_positions(offsets, positions)[segment_ids(offsets, total)]
                           != positions_in_segment(offsets, total)).any()):
            raise ValueError(f"{name}: positions must be consecutive within each user")

    def check_state(self, state: _UserState, batch: int, dtype: torch.dtype) -> None:
        """One-line ``ValueError`` unless ``state`` fits this layer's config, ``batch`` users and ``dtype``."""
        expected = self.init_state(0, state.start.device, dtype)
        name = type(self).__name__
        if type(state) is not type(expected):
            raise ValueError(f"{name}: state must be {type(expected).__name__}, got {type(state).__name__}")
        if state.batch != batch:
            raise ValueError(f"{name}: state holds {state.batch} users, but offsets describe {batch}")
        for field, shape in expected.shapes().items():
            got = getattr(state, field)
            if tuple(got.shape[1:]) != shape or got.dtype != getattr(expected, field).dtype:
                raise ValueError(f"{name}: state.{field} is {got.dtype} {tuple(got.shape)}, this layer "
                                 f"expects {getattr(expected, field).dtype} (B, {', '.join(map(str, shape))})")

    # -- streaming -----------------------------------------------------------------------------------

    def step(self, x: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, state: _UserState,
             *, check_inputs: bool = True) -> tuple[Tensor, _UserState]:
        """Continue each user's state with new events; returns ``(out (sum_b n_b, dim), new state)``.

        ``x, offsets, positions, cos, sin`` describe the new events only (``n_b >= 0`` per user); user b's
        first new position must be ``state.start[b] + state.count[b]`` unless the user has no events yet.
        Users are processed together, in pieces of at most ``cfg.step_piece`` events each.
        ``check_inputs=False`` skips the checks (device syncs) for callers that validated once.
        """
        if check_inputs:
            self.check_inputs(x, offsets, positions, cos, sin)
            self.check_state(state, offsets.numel() - 1, x.dtype)
            _check_continuation(type(self).__name__, offsets, positions, state)
        lengths = offsets_to_lengths(offsets)
        piece = self.cfg.step_piece
        outs, rows = [], []
        for first in range(0, int(lengths.max()) if lengths.numel() else 0, piece):
            piece_lengths = (lengths - first).clamp(min=0, max=piece)
            piece_offsets = lengths_to_offsets(piece_lengths)
            total = int(piece_offsets[-1])
            at = offsets[:-1][segment_ids(piece_offsets, total)] + first + positions_in_segment(piece_offsets, total)
            y, state = self._step_piece(x[at], piece_lengths, piece_offsets, positions[at], cos[at], sin[at], state)
            outs.append(y)
            rows.append(at)
        if not outs:
            return x.new_zeros(x.shape[0], self.dim), state
        return x.new_zeros(x.shape[0], self.dim).index_put((torch.cat(rows),), torch.cat(outs)), state

    def _piece_layout(self, lengths: Tensor, offsets: Tensor, positions: Tensor,
                      state: _UserState) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(valid [B, P], pos [B, P], base [B], start [B], count [B])`` of a piece: padded rows, their
        positions (consecutive from ``base``, padding included), and the user's start/count after it."""
        width = int(lengths.max())
        valid = torch.arange(width, device=lengths.device) < lengths[:, None]
        first = _first_positions(offsets, positions)
        base = torch.where(state.count > 0, state.start + state.count, first)
        start = torch.where(state.count > 0, state.start, base)
        return valid, base[:, None] + torch.arange(width, device=base.device), base, start, state.count + lengths

    def init_state(self, batch: int, device, dtype) -> _UserState:
        """Empty state for ``batch`` users; each layer kind defines its own."""
        raise NotImplementedError

    def _step_piece(self, x: Tensor, lengths: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor,
                    sin: Tensor, state: _UserState) -> tuple[Tensor, _UserState]:
        """Outputs ``(sum_b n_b, dim)`` of one piece (``n_b <= step_piece``) and the state after it."""
        raise NotImplementedError


class MkaAttention(_MkaLayerBase):
    """Layer kind ``"mka"``: three memory levels, each a softmax attention, mixed by a query-side router.

    Per event t and head: ``out_t = sum_l lambda_l(t) softmax(q k_l^T / sqrt(d)) v_l`` with
    L1 = rotated q against the last W1 rotated keys, L2 = q against S2 normalised EMA slots of (k, v),
    L3 = q against the means of the newest M3 blocks whose last event left the L1 window; then the output
    projection. ``lambda(t) = softmax(router(x_t))`` is shared by heads.
    """

    state_class = MkaState

    def __init__(self, dim: int, num_heads: int, cfg: MkaConfig):
        super().__init__(dim, num_heads, cfg)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.decay_logit = decay_logits(cfg, num_heads)  # [H, S2]

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``x [N, dim]`` -> ``(q, k, v, q_rot, k_rot)``, each ``[N, H, head_dim]``."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        return q, k, v, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _mix(self, x: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
             max_len: int) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        q, k, v, q_rot, k_rot = self.project(x, cos, sin)
        a1 = local_attention(q_rot, k_rot, v, offsets, window=cfg.local_window, backend=cfg.window_backend)
        a2 = mka_session(q, k, v, self.log_decay(), offsets, max_len, scale=self.scale, chunk=cfg.scan_chunk)
        a3, has_bank = bank_attention(q, k, v, offsets, positions, local_window=cfg.local_window,
                                      block_size=cfg.block_size, max_blocks=cfg.max_blocks, scale=self.scale,
                                      max_len=max_len)
        weights = level_weights(self.router(x), has_bank, cfg.mask_empty_bank)
        return mix_levels(weights, a1, a2, a3).flatten(1), weights

    def bank_slots(self) -> int:
        cfg = self.cfg
        return bank_slots(cfg.local_window, cfg.block_size, cfg.max_blocks, cfg.step_piece)

    def init_state(self, batch: int, device, dtype) -> MkaState:
        """Empty state for ``batch`` users (``start``/``count`` 0, memories zero)."""
        cfg, heads, width = self.cfg, self.num_heads, 2 * self.head_dim
        slots = self.bank_slots()
        ints = dict(dtype=torch.int64, device=device)
        floats = dict(dtype=dtype, device=device)
        return MkaState(start=torch.zeros(batch, **ints), count=torch.zeros(batch, **ints),
                        ring_kv=torch.zeros(batch, cfg.local_window, heads, width, **floats),
                        ema_num=torch.zeros(batch, heads, cfg.session_slots, width, **floats),
                        ema_den=torch.zeros(batch, heads, cfg.session_slots, **floats),
                        bank_sum=torch.zeros(batch, slots, heads, width, **floats),
                        bank_count=torch.zeros(batch, slots, **ints))

    def _step_piece(self, x: Tensor, lengths: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                    state: MkaState) -> tuple[Tensor, MkaState]:
        """One piece (``n_b <= step_piece``): the three levels against the state, then the state update."""
        cfg, scale = self.cfg, self.scale
        valid, pos, _, start, count = self._piece_layout(lengths, offsets, positions, state)
        width = pos.shape[1]
        q, k, v, q_rot, k_rot = self.project(x, cos, sin)
        q_pad = jagged_to_padded(q, offsets, width)
        kv = jagged_to_padded(torch.cat([k, v], dim=-1), offsets, width)
        kv_rot = jagged_to_padded(torch.cat([k_rot, v], dim=-1), offsets, width)
        # L1: the ring (events before the piece) then the piece itself, under the window rule.
        had_events = state.count > 0
        last_before = state.start + state.count - 1
        ring_pos, ring_valid = ring_index(last_before, state.start, had_events, cfg.local_window)
        keys, values = torch.cat([state.ring_kv, kv_rot], dim=1).split(self.head_dim, dim=-1)
        a1 = window_attention_cached(jagged_to_padded(q_rot, offsets, width), pos, keys, values,
                                     torch.cat([ring_pos, pos], 1), torch.cat([ring_valid, valid], 1),
                                     window=cfg.local_window, scale=scale)
        # L2: the chunked scan, started from the carried EMAs.
        num, den = ema_scan(kv, self.log_decay(), state.ema_num, state.ema_den, chunk=cfg.scan_chunk)
        a2 = session_attention(q_pad, num, den, scale)
        # L3: add the piece to the bank first; a block a query sees is complete before it (README).
        open_block = torch.where(had_events, torch.div(last_before, cfg.block_size, rounding_mode="floor"), -1)
        bank_sum, bank_count = bank_update(state.bank_sum, state.bank_count, kv, pos, valid, open_block,
                                           cfg.block_size)
        newest = start + count - 1
        block_ids, block_valid = ring_index(torch.div(newest, cfg.block_size, rounding_mode="floor"),
                                            torch.div(start, cfg.block_size, rounding_mode="floor"), count > 0,
                                            bank_sum.shape[1])
        a3, has_bank = bank_attention_cached(q_pad, pos, bank_sum, bank_count, block_ids, block_valid,
                                             local_window=cfg.local_window, block_size=cfg.block_size,
                                             max_blocks=cfg.max_blocks, scale=scale)
        weights = level_weights(self.router(x), has_bank[valid], cfg.mask_empty_bank)
        out = self.out(mix_levels(weights, a1[valid], a2[valid], a3[valid]).flatten(1))
        return out, MkaState(start=start, count=count, ring_kv=ring_write(state.ring_kv, kv_rot, pos, valid, newest),
                             ema_num=take_last(num, lengths, state.ema_num),
                             ema_den=take_last(den, lengths, state.ema_den), bank_sum=bank_sum,
                             bank_count=bank_count)


class FastMkaAttention(_MkaLayerBase):
    """Layer kind ``"fastmka"``: route-fused, key-side (MKA.md section 3).

    ``x_fused_j = lambda_1(j) x_j + lambda_2(j) L2_j + lambda_3(j) L3_j`` with L2 = the mean of the S2
    normalised EMAs of x and L3 = the running mean of x over j's block up to j; then ``K, V`` are projected
    from ``x_fused``, ``Q`` from x, RoPE on q and k, and one causal attention over the last ``fast_window``
    events (all earlier events if None); then the output projection.
    """

    state_class = FastMkaState

    def __init__(self, dim: int, num_heads: int, cfg: MkaConfig):
        super().__init__(dim, num_heads, cfg)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.decay_logit = decay_logits(cfg)  # [S2]: the EMAs run on x, which has no heads

    def project_fused(self, x: Tensor, fused: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q_rot, k_rot, v)`` ``[N, H, head_dim]``: q from ``x [N, dim]``, k and v from ``fused [N, dim]``."""
        q = self.q_proj(x).view(x.shape[0], self.num_heads, self.head_dim)
        k, v = self.kv_proj(fused).view(x.shape[0], 2, self.num_heads, self.head_dim).unbind(1)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _mix(self, x: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
             max_len: int) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        fused, weights = fastmka_sources(x, self.router(x), self.log_decay(), offsets, positions, max_len,
                                         block_size=cfg.block_size, chunk=cfg.scan_chunk)
        q_rot, k_rot, v = self.project_fused(x, fused, cos, sin)
        out = local_attention(q_rot, k_rot, v, offsets, window=cfg.fast_window, backend=cfg.window_backend)
        return out.flatten(1), weights

    def init_state(self, batch: int, device, dtype) -> FastMkaState:
        """Empty state for ``batch`` users. Needs a bounded ``fast_window`` (the fused K/V cache size)."""
        cfg = self.cfg
        if cfg.fast_window is None:
            raise ValueError("FastMkaAttention: streaming needs mka.fast_window set (it bounds the fused K/V "
                             "cache of each user); got None")
        ints = dict(dtype=torch.int64, device=device)
        floats = dict(dtype=dtype, device=device)
        return FastMkaState(start=torch.zeros(batch, **ints), count=torch.zeros(batch, **ints),
                            ring_kv=torch.zeros(batch, cfg.fast_window, self.num_heads, 2 * self.head_dim, **floats),
                            ema_num=torch.zeros(batch, cfg.session_slots, self.dim, **floats),
                            ema_den=torch.zeros(batch, cfg.session_slots, **floats),
                            block_sum=torch.zeros(batch, self.dim, **floats),
                            block_count=torch.zeros(batch, **ints))

    def _step_piece(self, x: Tensor, lengths: Tensor, offsets: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                    state: FastMkaState) -> tuple[Tensor, FastMkaState]:
        """One piece: fused sources from the carried EMAs and open block, then attention over the ring."""
        cfg = self.cfg
        valid, pos, base, start, count = self._piece_layout(lengths, offsets, positions, state)
        width = pos.shape[1]
        x_pad = jagged_to_padded(x, offsets, width)
        num, den = ema_scan(x_pad[:, :, None], self.log_decay()[None], state.ema_num[:, None],
                            state.ema_den[:, None], chunk=cfg.scan_chunk)
        had_events = state.count > 0
        last_before = state.start + state.count - 1
        open_block = torch.where(had_events, torch.div(last_before, cfg.block_size, rounding_mode="floor"), -1)
        block, block_sum, block_count = block_running_mean_cached(x_pad, base, valid, state.block_sum,
                                                                  state.block_count, open_block, cfg.block_size)
        session = session_summary(num[:, :, 0], den[:, :, 0])
        fused = fuse_sources(x, session[valid], block[valid], torch.softmax(self.router(x), dim=-1))
        q_rot, k_rot, v = self.project_fused(x, fused, cos, sin)
        kv_rot = jagged_to_padded(torch.cat([k_rot, v], dim=-1), offsets, width)
        ring_pos, ring_valid = ring_index(last_before, state.start, had_events, cfg.fast_window)
        keys, values = torch.cat([state.ring_kv, kv_rot], dim=1).split(self.head_dim, dim=-1)
        out = window_attention_cached(jagged_to_padded(q_rot, offsets, width), pos, keys, values,
                                      torch.cat([ring_pos, pos], 1), torch.cat([ring_valid, valid], 1),
                                      window=cfg.fast_window, scale=self.scale)[valid]
        newest = start + count - 1
        return self.out(out.flatten(1)), FastMkaState(
            start=start, count=count, ring_kv=ring_write(state.ring_kv, kv_rot, pos, valid, newest),
            ema_num=take_last(num[:, :, 0], lengths, state.ema_num),
            ema_den=take_last(den[:, :, 0], lengths, state.ema_den), block_sum=block_sum, block_count=block_count)


def _first_positions(offsets: Tensor, positions: Tensor) -> Tensor:
    """Position of each user's first row ``[B]`` (another user's for empty users); needs T >= 1."""
    return positions[offsets[:-1].clamp(max=positions.shape[0] - 1)]


def _check_continuation(name: str, offsets: Tensor, positions: Tensor, state: _UserState) -> None:
    """Users with events in ``state`` must continue at ``start + count``."""
    if positions.shape[0] == 0:
        return
    resumed = (state.count > 0) & (offsets_to_lengths(offsets) > 0)
    if bool((resumed & (_first_positions(offsets, positions) != state.start + state.count)).any()):
        raise ValueError(f"{name}: new events must continue each user's state at position start + count")


__all__ = ["FastMkaAttention", "FastMkaState", "MkaAttention", "MkaConfig", "MkaState", "build_router"]
