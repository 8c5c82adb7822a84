"""The sequence encoder: pre-norm blocks [norm -> attention(kind) -> norm -> FFN], one kind per layer.

With any layer that reads summaries (``ksa``) in the pattern, a summary stream runs beside the events
(KSA.md section 4): ``S`` summary tokens enter after every complete chunk, share norms, output projections
and FFNs with the events, and are dropped at the end. A summary's input is its learned slot embedding
plus the time part of the chunk's last event; with ``summary_init: chunk`` (KSA.md section 11) also a
learned map of the mean of the event inputs of its slice of the chunk, so that the first layer's
summaries already carry the chunk's content. Streaming keeps the open chunk's event inputs for that
(``OpenChunk``), and builds the summary when its chunk completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ksa_rec.modules.attention import KINDS, FixedLayout, StepLayout, StreamLayout
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.graphs import EncoderGraphs
from ksa_rec.ops.ksa.layout import summary_index, summary_position
from ksa_rec.ops.ksa.step import StepTokens, share_layouts
from ksa_rec.ops.norm import add_rms_norm
from ksa_rec.ops.rope import RotaryEmbedding
from ksa_rec.utils.jagged import lengths_to_offsets, segment_ids, validate_offsets


@dataclass
class PassPlan:
    """What a training or scoring pass derives from its batch layout alone (``SequenceEncoder.plan``): the
    same for every batch of that layout, so a captured pass keeps it (``ksa_rec.modules.graphs``).

    ``offsets [B+1]``, ``max_len``; with a summary stream, per summary row (``summary_index`` order): its
    slot ``[Ts]``, the row of its chunk's last event ``[Ts]`` (time part), the row whose rotary tables it takes
    ``[Ts]``, and under ``summary_init: chunk`` the rows of its chunk slice ``[Ts, k // S]``; ``op_tables``:
    what the attention op shares between the layers (``StreamLayout.op_tables``)."""

    offsets: Tensor
    max_len: int
    summary_slot: Tensor | None = None
    summary_last_rows: Tensor | None = None
    summary_rope_rows: Tensor | None = None
    slice_rows: Tensor | None = None
    op_tables: dict = field(default_factory=dict)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter, same state dict) run by ``ksa_rec.ops.norm``'s dispatcher, with the residual
    add before it fusable (``add_and_norm``)."""

    def __init__(self, dim: int, backend: str | None):
        super().__init__(dim)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return add_rms_norm(x, self.weight, self.eps, backend=self.backend)[1]

    def add_and_norm(self, h: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """``(h + a, norm(h + a))``."""
        return add_rms_norm(h, self.weight, self.eps, residual=a, backend=self.backend)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim))


class SwiGLU(nn.Module):
    """``W_out dropout(silu(x W_a) * (x W_b))`` with hidden width ``mult * dim`` (``W_a``, ``W_b`` as one matmul)."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.inner = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.inner(x).chunk(2, dim=-1)
        return self.out(self.dropout(F.silu(gate) * value))


FFN_KINDS = {"gelu": FeedForward, "swiglu": SwiGLU}


class Block(nn.Module):
    """One pre-norm transformer block; events and summaries share everything but Q/K/V projections, so both
    streams go through it as one tensor (events, then summaries), in training as in a streaming step."""

    def __init__(self, kind: str, cfg: EncoderConfig, with_summaries: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_backend)
        self.attn = KINDS[kind](cfg, with_summaries)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_backend)
        self.ffn = FFN_KINDS[cfg.ffn_activation](cfg.dim, cfg.ffn_mult, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        # LiGR's gated residuals (EncoderConfig.residual_gates): None keeps the plain residual add
        self.attn_gate = nn.Linear(cfg.dim, cfg.dim) if cfg.residual_gates else None
        self.ffn_gate = nn.Linear(cfg.dim, cfg.dim) if cfg.residual_gates else None

    def forward(self, h: Tensor, layout: StreamLayout) -> Tensor:
        """``h [T + Ts, dim]``: the batch's events, then its summaries (``StreamLayout``)."""
        return self.residual_and_ffn(h, self.attn(self.attn_norm(h), layout))

    def step(self, h: Tensor, sl: StepLayout, state):
        """Streaming form of ``forward`` for the step's tokens (events, then summaries: ``StepLayout``);
        returns ``(h, state)``."""
        a, state = self.attn.step(self.attn_norm(h), sl, state)
        return self.residual_and_ffn(h, a), state

    def fixed_step(self, h: Tensor, layout: FixedLayout, cache) -> Tensor:
        """``step`` in fixed-capacity buffers (``SequenceEncoder.fixed_step``); ``cache`` updated in place."""
        return self.residual_and_ffn(h, self.attn.fixed_step(self.attn_norm(h), layout, cache))

    def residual_and_ffn(self, h: Tensor, a: Tensor) -> Tensor:
        """``h + a`` and the feed-forward block after it (each branch gated when ``residual_gates``)."""
        h, x = self.ffn_norm.add_and_norm(h, self.gated(self.attn_gate, h, self.dropout(a)))
        return h + self.gated(self.ffn_gate, h, self.dropout(self.ffn(x)))

    @staticmethod
    def gated(gate: nn.Linear | None, h: Tensor, branch: Tensor) -> Tensor:
        return branch if gate is None else torch.sigmoid(gate(h)) * branch


class SequenceEncoder(nn.Module):
    """Event tokens of a jagged batch -> contextual event states.

    Inputs: ``tokens (sum_b n_b, dim)``, ``offsets [B+1]``, ``positions (sum_b n_b,)`` absolute event
    indices (chunks are anchored at index 0 of each user, and truncation keeps whole chunks, so
    ``positions - positions[first]`` is a multiple of ``chunk_size``), ``time_part (sum_b n_b, dim)``
    or None. Output: ``(sum_b n_b, dim)`` after the final norm.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.with_summaries = cfg.uses_summaries
        self.blocks = nn.ModuleList(Block(kind, cfg, self.with_summaries) for kind in cfg.layers)
        self.rope = RotaryEmbedding(cfg.dim // cfg.num_heads, cfg.rope_base)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_backend)
        self.summary_pool = None
        self.graphs = EncoderGraphs() if cfg.cuda_graphs else None
        if self.with_summaries:
            self.summary_embedding = nn.Parameter(torch.randn(cfg.summary_tokens, cfg.dim) * cfg.dim ** -0.5)
            if cfg.summary_init == "chunk":
                self.summary_pool = nn.Linear(cfg.dim, cfg.dim, bias=False)
                if cfg.summary_qkv != "own":
                    nn.init.eye_(self.summary_pool.weight)

    @property
    def keeps_open_chunk(self) -> bool:
        """Whether streaming keeps the open chunk's event inputs (``summary_init: chunk``)."""
        return self.summary_pool is not None

    def summary_inputs(self, slot: Tensor, last_rows: Tensor, time_part: Tensor | None,
                       slices: Tensor | None) -> Tensor:
        """Summary-stream input tokens ``[Ts, dim]``: each slot's learned embedding, plus the time part of its
        chunk's last event (row ``last_rows`` of ``time_part``), plus, with ``summary_init: chunk``, the
        pooled event inputs of its slice ``slices [Ts, k // S, dim]``."""
        # Gathers as embedding / index_select, not ``t[idx]``: on CUDA the backward of advanced indexing
        # sorts and then sums each row's duplicates serially, and every summary reads one of S rows (5.4 of a
        # 65K-event step's 18.5 device ms at dim 64 on an H100: docs/results/training-speed.md).
        xs = nn.functional.embedding(slot, self.summary_embedding)
        if self.summary_pool is not None:
            xs = xs + self.summary_pool(slices.mean(1))
        return xs if time_part is None else xs + time_part.index_select(0, last_rows)

    def slice_positions(self, chunk: Tensor, slot: Tensor) -> Tensor:
        """Absolute event indices ``[Ts, k // S]`` of the slice of chunk ``chunk`` that summary slot ``slot``
        reads (for S = 1 the whole chunk)."""
        width = self.cfg.chunk_size // self.cfg.summary_tokens
        first = chunk * self.cfg.chunk_size + slot * width
        return first[:, None] + torch.arange(width, device=chunk.device)

    def forward(self, tokens: Tensor, offsets: Tensor, positions: Tensor, time_part: Tensor | None = None,
                max_len: int | None = None, read_summaries: list[Tensor] | None = None) -> Tensor:
        """``read_summaries``: if a list, it receives the summary states ``[Ts, dim]`` entering every layer
        that reads summaries and whose summary keys carry chunk content (under ``summary_init: slot`` not
        the first layer: a summary enters it as its slot embedding), rows in ``summary_index`` order.

        With ``cuda_graphs`` a training pass on CUDA replays a captured graph where the batch layout repeats
        (``ksa_rec.modules.graphs``); every other pass, and any pass the graphs decline, runs here eagerly."""
        if self.graphs is not None and read_summaries is None and self.training and torch.is_grad_enabled():
            out = self.graphs(self, tokens, offsets, positions, time_part, max_len)
            if out is not None:
                return out
        return self.run(tokens, positions, time_part, self.plan(offsets, tokens.shape[0], max_len), read_summaries)

    def plan(self, offsets: Tensor, num_events: int, max_len: int | None = None) -> PassPlan:
        """What a pass derives from the layout ``offsets [B+1]`` of ``num_events`` events alone (checked here,
        once: every layer's op then skips the checks that sync a GPU)."""
        validate_offsets(offsets, num_events)
        if max_len is None:
            max_len = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
        if not self.with_summaries:
            return PassPlan(offsets, max_len)
        k, S = self.cfg.chunk_size, self.cfg.summary_tokens
        user, chunk, slot = summary_index(offsets, k, S)
        # chunk numbers count from each user's first event in the batch (a chunk boundary)
        first = offsets[user]
        slice_rows = first[:, None] + self.slice_positions(chunk, slot) if self.keeps_open_chunk else None
        # A summary takes the position of an event of its chunk: the rotary tables are that event's.
        return PassPlan(offsets, max_len, slot, first + chunk * k + k - 1, first + summary_position(chunk, slot, k, S),
                        slice_rows)

    def run(self, tokens: Tensor, positions: Tensor, time_part: Tensor | None, plan: PassPlan,
            read_summaries: list[Tensor] | None = None) -> Tensor:
        """The pass over a planned layout (``forward``'s arguments; ``plan`` from ``plan``). No host reads: a
        CUDA graph can capture it."""
        cos, sin = self.rope.tables(positions, tokens.dtype)
        if self.training and self.cfg.event_mask > 0:
            # Whole tokens, before anything reads them: the summaries' chunk pooling sees the masked events too.
            keep = torch.rand(tokens.shape[0], 1, device=tokens.device) >= self.cfg.event_mask
            tokens = tokens * keep.to(tokens.dtype)
        h, n = self.input_dropout(tokens), tokens.shape[0]
        if self.with_summaries:
            slices = None
            if plan.slice_rows is not None:
                slices = tokens.index_select(0, plan.slice_rows.flatten()).view(*plan.slice_rows.shape, -1)
            xs = self.summary_inputs(plan.summary_slot, plan.summary_last_rows, time_part, slices)
            rows = plan.summary_rope_rows
            cos, sin = torch.cat([cos, cos[rows]]), torch.cat([sin, sin[rows]])
            h = torch.cat([h, self.input_dropout(xs)])
        layout = StreamLayout(offsets=plan.offsets, max_len=plan.max_len, positions=positions, cos=cos, sin=sin,
                              op_tables=plan.op_tables)
        for i, block in enumerate(self.blocks):
            if read_summaries is not None and block.attn.reads_summaries and (i > 0 or self.keeps_open_chunk):
                read_summaries.append(h[n:])
            h = block(h, layout)
        return self.final_norm(h[:n])  # the events (a view)

    # ---- streaming -----------------------------------------------------------------------------------------
    def empty_states(self, batch: int, dtype: torch.dtype, device) -> list:
        """The streaming state of ``batch`` users with no events: one per block, then ``OpenChunk`` when the
        summaries pool their chunk (``keeps_open_chunk``)."""
        states = share_layouts([block.attn.empty_state(batch, dtype, device) for block in self.blocks])
        return states + ([OpenChunk.empty(batch, self.cfg.dim, dtype, device)] if self.keeps_open_chunk else [])

    def stack_states(self, users: list[list[dict[str, Tensor]]], device=None) -> list:
        """Per-user state tensors (``users[u][i]``, ``state.user(b)`` of ``empty_states``' entries) -> the
        batched state, on ``device`` (None: where the tensors are). Layers that keep the same rows share
        their index tensors (``share_layouts``)."""
        states = share_layouts([block.attn.stack_states([u[i] for u in users]) for i, block in enumerate(self.blocks)])
        if self.keeps_open_chunk:
            states.append(OpenChunk.stack([u[len(self.blocks)] for u in users]))
        if device is None:
            return states
        moved = {}  # one dict for every state: tensors shared between layers stay shared
        return [state.to(device, moved) for state in states]

    def step(self, tokens: Tensor, offsets: Tensor, event_count: Tensor, time_part: Tensor | None,
             states: list) -> tuple[Tensor, list]:
        """Continue B users' histories by new events; equal to ``forward`` over the whole histories.

        Args:
            tokens: ``(sum_b t_b, dim)`` embeddings of the new events; offsets ``[B+1]`` (t_b may be 0).
            event_count: int64 ``[B]`` events each user had before (the new ones get indices from there).
            time_part: ``(sum_b t_b, dim)`` or None, as in ``forward``.
            states: the B users' state (``empty_states`` / ``stack_states``).
        Returns:
            ``(states of the new events (sum_b t_b, dim) after the final norm, updated states)``.
        """
        k, S = self.cfg.chunk_size, self.cfg.summary_tokens
        n = tokens.shape[0]
        if offsets.numel() == 2:  # one user (a serving request): its events follow its count, no gathers
            seg = torch.zeros(n, dtype=torch.int64, device=tokens.device) if self.with_summaries else None
            positions = event_count + torch.arange(n, device=tokens.device)
        else:
            seg = segment_ids(offsets, n)
            positions = event_count[seg] + torch.arange(n, device=tokens.device) - offsets[seg]
        next_index = event_count + offsets[1:] - offsets[:-1]
        block_states = states[:len(self.blocks)]
        open_chunk = states[len(self.blocks)] if self.keeps_open_chunk else None
        inputs = open_chunk.with_new(tokens, offsets, event_count) if open_chunk is not None else None
        x, stream_positions = tokens, positions
        sum_ids, sum_offsets = positions[:0], torch.zeros_like(offsets)
        # Each new event that ends a chunk brings that chunk's S summary tokens into this step.
        ends = torch.nonzero((positions + 1) % k == 0).squeeze(1) if self.with_summaries else positions[:0]
        if ends.numel():
            rows = ends.repeat_interleave(S)
            slot = torch.arange(S, device=tokens.device).repeat(ends.numel())
            chunk = positions[rows] // k
            sum_ids = chunk * S + slot
            sum_offsets = torch.searchsorted(seg[rows], torch.arange(offsets.numel(), device=tokens.device))
            stream_positions = torch.cat([positions, summary_position(chunk, slot, k, S)])
            slices = inputs.take(seg[rows], self.slice_positions(chunk, slot)) if inputs is not None else None
            x = torch.cat([tokens, self.summary_inputs(slot, rows, time_part, slices)])
        cos, sin = self.rope.tables(stream_positions, tokens.dtype)
        sl = StepLayout(StepTokens.build(offsets, positions, sum_offsets, sum_ids, next_index), cos, sin,
                        self.with_summaries)
        new_states = []
        for block, state in zip(self.blocks, block_states):
            x, state = block.step(x, sl, state)
            new_states.append(state)
        if inputs is not None:
            new_states.append(inputs.open_chunk(next_index // k * k))
        return self.final_norm(x[:n]), new_states

    # ---- streaming in fixed-capacity buffers (CUDA-graph capturable) -------------------------------------------
    def empty_fixed_state(self, batch: int, capacity: int, dtype: torch.dtype, device) -> FixedState:
        """The fixed-capacity state (``FixedState``) of ``batch`` users with no events, for histories of fewer
        than ``capacity`` events."""
        inputs = (torch.zeros(batch, self.cfg.chunk_size, self.cfg.dim, dtype=dtype, device=device)
                  if self.keeps_open_chunk else None)
        return FixedState([block.attn.empty_fixed_state(batch, capacity, dtype, device) for block in self.blocks],
                          inputs, torch.zeros(batch, dtype=torch.int64, device=device), capacity)

    def fixed_state(self, states: list, event_count: Tensor, capacity: int, dtype: torch.dtype | None = None,
                    device=None) -> FixedState:
        """A jagged streaming state (``empty_states`` / ``stack_states`` / ``step``) of users with ``event_count
        [B]`` events -> the same state in fixed buffers for histories of fewer than ``capacity`` events."""
        users = [[state.user(b) for state in states] for b in range(len(event_count))]
        return self.fixed_state_of_users(users, event_count, capacity, dtype, device)

    def fixed_state_of_users(self, users: list[list[dict[str, Tensor]]], event_count: Tensor, capacity: int,
                             dtype: torch.dtype | None = None, device=None, out: FixedState | None = None
                             ) -> FixedState:
        """``fixed_state`` from per-user states (``users[b][i]``, as ``stack_states`` takes them and a stored
        state keeps them). ``out``: a state of as many users and this capacity to write into instead of a new one
        (every user's rows are reset; rows of the buffers no identity points to may keep old values)."""
        counts = [int(n) for n in event_count]
        if counts and max(counts) >= capacity:
            raise ValueError(f"fixed-capacity state: a user has {max(counts)} events, capacity is {capacity}")
        first = users[0][0]["k"] if counts else None
        dtype = dtype or (first.dtype if first is not None else torch.float32)
        device = device or (first.device if first is not None else "cpu")
        if out is not None and (out.capacity, out.event_count.shape[0]) != (capacity, len(counts)):
            raise ValueError(f"fixed_state_of_users: out holds {out.event_count.shape[0]} users of capacity "
                             f"{out.capacity}, not {len(counts)} of {capacity}")
        fixed = out if out is not None else self.empty_fixed_state(len(counts), capacity, dtype, device)
        k = self.cfg.chunk_size
        for b, (n, user) in enumerate(zip(counts, users)):
            for cache, layer in zip(fixed.layers, user):
                cache.load(b, layer)
            if fixed.inputs is not None:
                x = user[len(self.blocks)]["x"]
                fixed.inputs[b, (n - x.shape[0] + torch.arange(x.shape[0])) % k] = x.to(device, dtype)
        fixed.event_count.copy_(event_count.to(device))
        return fixed

    def unfixed_states(self, fixed: FixedState) -> list:
        """``fixed_state``'s inverse: the jagged state (as ``stack_states`` gives it) of the same users."""
        return self.stack_states(self.unfixed_users(fixed))

    def unfixed_users(self, fixed: FixedState, users: int | None = None) -> list[list[dict[str, Tensor]]]:
        """``fixed_state_of_users``' inverse for its first ``users`` users (default all)."""
        k = self.cfg.chunk_size
        out = []
        for b, n in enumerate(int(c) for c in fixed.event_count[:users]):
            user = [block.attn.unfixed_user(cache, b, n) for block, cache in zip(self.blocks, fixed.layers)]
            if fixed.inputs is not None:
                user.append({"x": fixed.inputs[b, (n - n % k + torch.arange(n % k)) % k]})
            out.append(user)
        return out

    def fixed_step(self, tokens: Tensor, time_part: Tensor | None, state: FixedState) -> Tensor:
        """``step`` for exactly one new event per user, in fixed-capacity buffers updated in place, with no host
        reads: a CUDA graph can capture it (``ksa_rec.modules.step_graphs``). Equal to ``step``.

        Args:
            tokens: ``[B, dim]`` embeddings of each user's new event; time_part ``[B, dim]`` or None.
            state: the B users' ``FixedState``; the caller keeps every event count below ``state.capacity``.
        Returns:
            ``[B, dim]``: the new events' states after the final norm.
        """
        k = self.cfg.chunk_size
        S = self.cfg.summary_tokens if self.with_summaries else 0
        B = tokens.shape[0]
        position = state.event_count.clone()
        x, stream_positions = tokens, position
        if S:
            users = torch.arange(B, device=tokens.device)
            if state.inputs is not None:
                state.inputs[users, position % k] = tokens.to(state.inputs.dtype)
            # every user's S summary tokens of its event's chunk (kept by the layers only where it completes)
            rows = users[:, None].expand(B, S).flatten()
            slot = torch.arange(S, device=tokens.device).repeat(B)
            chunk = torch.div(position, k, rounding_mode="floor")[:, None].expand(B, S).flatten()
            slices = None
            if state.inputs is not None:  # chunk c's slice j is rows j*k/S .. of the open chunk's ring
                slices = state.inputs.view(B * S, k // S, -1).to(tokens.dtype)
            x = torch.cat([tokens, self.summary_inputs(slot, rows, time_part, slices)])
            stream_positions = torch.cat([position, summary_position(chunk, slot, k, S)])
        cos, sin = self.rope.tables(stream_positions, tokens.dtype)
        layout = FixedLayout(position, S, cos, sin)
        for block, cache in zip(self.blocks, state.layers):
            x = block.fixed_step(x, layout, cache)
        state.event_count.add_(1)
        return self.final_norm(x[:B])


@dataclass
class FixedState:
    """B users' streaming state in fixed-capacity buffers (``SequenceEncoder.fixed_step``): one ``FixedCache``
    a block (``ksa_rec.ops.ksa.fixed``); under ``summary_init: chunk`` the open chunk's event inputs ``inputs
    [B, k, dim]`` (event i at row i % k); each user's event count ``event_count [B]``; ``capacity``: histories
    must stay below it. A step updates every tensor in place, so the tensors a graph captured stay valid."""

    layers: list
    inputs: Tensor | None
    event_count: Tensor
    capacity: int

    @property
    def tensors(self) -> list[Tensor]:
        out = [t for cache in self.layers for t in (cache.k, cache.v, cache.idx)]
        return out + ([self.inputs] if self.inputs is not None else []) + [self.event_count]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def copy_(self, source: FixedState) -> FixedState:
        """Copy ``source`` (the same users' count and capacity, any device or pinned host) into these buffers in
        place, so that tensors a CUDA graph captured keep reading them. Returns self."""
        if source.capacity != self.capacity or source.event_count.shape != self.event_count.shape:
            raise ValueError(f"FixedState.copy_: this state holds {self.event_count.shape[0]} users of capacity "
                             f"{self.capacity}, the source {source.event_count.shape[0]} of {source.capacity}")
        for target, tensor in zip(self.tensors, source.tensors, strict=True):
            target.copy_(tensor)
        return self


@dataclass
class OpenChunk:
    """The event inputs (layer-0 tokens) of each user's open chunk, kept by the streaming state when the
    summaries pool their chunk (``summary_init: chunk``): ``x (sum_b m_b, dim)`` with ``offsets [B+1]``,
    ``m_b = event_count_b % k`` rows, oldest first. At most ``k - 1`` rows a user."""

    x: Tensor
    offsets: Tensor

    @classmethod
    def empty(cls, batch: int, dim: int, dtype: torch.dtype, device) -> OpenChunk:
        return cls(torch.zeros(0, dim, dtype=dtype, device=device),
                   torch.zeros(batch + 1, dtype=torch.int64, device=device))

    def user(self, b: int) -> dict[str, Tensor]:
        return {"x": self.x[int(self.offsets[b]):int(self.offsets[b + 1])]}

    @classmethod
    def stack(cls, users: list[dict[str, Tensor]]) -> OpenChunk:
        x = torch.cat([u["x"] for u in users])
        lengths = torch.tensor([u["x"].shape[0] for u in users], dtype=torch.int64)
        return cls(x, lengths_to_offsets(lengths).to(x.device))

    def to(self, device, moved: dict | None = None) -> OpenChunk:
        return OpenChunk(self.x.to(device), self.offsets.to(device))

    @property
    def num_bytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def with_new(self, tokens: Tensor, offsets: Tensor, event_count: Tensor) -> _StepInputs:
        """This state's rows, then each user's new events ``tokens`` (offsets ``[B+1]``) after them."""
        return _StepInputs(torch.cat([self.x, tokens]), self.offsets, offsets, event_count)


@dataclass
class _StepInputs:
    """During a step: each user's open-chunk inputs followed by its new event inputs, addressed by absolute
    event index. Rows: ``table = cat([open rows, new rows])``; user b's open rows hold its events
    ``event_count_b - m_b .. event_count_b - 1``, its new rows the events from ``event_count_b`` on."""

    table: Tensor
    open_offsets: Tensor
    new_offsets: Tensor
    event_count: Tensor

    def rows(self, users: Tensor, positions: Tensor) -> Tensor:
        """Rows of ``table`` holding users ``users [R]``' events ``positions [R, ...]`` (absolute indices)."""
        shape = (-1,) + (1,) * (positions.dim() - 1)
        count = self.event_count[users].view(shape)
        open_end = self.open_offsets[users + 1].view(shape)
        n_open = self.open_offsets[-1]
        return torch.where(positions < count, open_end + positions - count,
                           n_open + self.new_offsets[users].view(shape) + positions - count)

    def take(self, users: Tensor, positions: Tensor) -> Tensor:
        """Inputs of users ``users [R]``' events ``positions [R, w]`` -> ``[R, w, dim]``."""
        return self.table[self.rows(users, positions)]

    def open_chunk(self, chunk_start: Tensor) -> OpenChunk:
        """The state after the step: each user's events from ``chunk_start [B]`` (its open chunk's first
        event) up to its newest."""
        next_index = self.event_count + self.new_offsets[1:] - self.new_offsets[:-1]
        lengths = next_index - chunk_start
        offsets = lengths_to_offsets(lengths)
        users = segment_ids(offsets, int(offsets[-1]))
        positions = chunk_start[users] + torch.arange(users.numel(), device=users.device) - offsets[users]
        return OpenChunk(self.table[self.rows(users, positions)], offsets)
