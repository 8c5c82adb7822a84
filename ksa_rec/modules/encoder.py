"""The sequence encoder: pre-norm blocks [norm -> attention(kind) -> norm -> FFN], one kind per layer.

With any layer that reads summaries (``ksa``) in the pattern, a summary stream runs beside the events
(KSA.md section 4):
``S`` learned slot embeddings (plus the time part of the chunk's last event) enter after every complete
chunk, share norms, output projections and FFNs with the events, and are dropped at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ksa_rec.modules.attention import KINDS, StepLayout, StreamLayout
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.ops.ksa.layout import summary_index, summary_position
from ksa_rec.ops.ksa.step import StepTokens, share_layouts
from ksa_rec.ops.rope import RotaryEmbedding
from ksa_rec.utils.jagged import segment_ids, validate_offsets


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim))


class Block(nn.Module):
    """One pre-norm transformer block; events and summaries share everything but Q/K/V projections."""

    def __init__(self, kind: str, cfg: EncoderConfig, with_summaries: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = KINDS[kind](cfg, with_summaries)
        self.ffn_norm = nn.RMSNorm(cfg.dim)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_mult, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, xs: Tensor | None, layout: StreamLayout) -> tuple[Tensor, Tensor | None]:
        a, a_sum = self.attn(self.attn_norm(x), None if xs is None else self.attn_norm(xs), layout)
        return self.residual_and_ffn(x, xs, a, a_sum)

    def step(self, x: Tensor, sl: StepLayout, state):
        """Streaming form of ``forward`` for the step's tokens (events, then summaries: ``StepLayout``);
        returns ``(x, state)``. Both streams share the norms and the FFN, so they go through them as one."""
        a, state = self.attn.step(self.attn_norm(x), sl, state)
        x = x + self.dropout(a)
        return x + self.dropout(self.ffn(self.ffn_norm(x))), state

    def residual_and_ffn(self, x: Tensor, xs: Tensor | None, a: Tensor, a_sum: Tensor | None):
        x = x + self.dropout(a)
        if xs is None:
            return x + self.dropout(self.ffn(self.ffn_norm(x))), None
        # One FFN call over both streams: same weights, one larger matmul.
        both = torch.cat([x, xs + self.dropout(a_sum)])
        both = both + self.dropout(self.ffn(self.ffn_norm(both)))
        return both[: x.shape[0]], both[x.shape[0]:]


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
        self.final_norm = nn.RMSNorm(cfg.dim)
        if self.with_summaries:
            self.summary_embedding = nn.Parameter(torch.randn(cfg.summary_tokens, cfg.dim) * cfg.dim ** -0.5)

    def summary_inputs(self, chunk: Tensor, slot: Tensor, last_rows: Tensor, time_part: Tensor | None) -> Tensor:
        """Summary-stream input tokens ``[Ts, dim]`` of slots ``slot`` of chunks ``chunk``: the slot's learned
        embedding plus the time part of the chunk's last event (its row of ``time_part``: ``last_rows``)."""
        xs = self.summary_embedding[slot]
        return xs if time_part is None else xs + time_part[last_rows]

    def forward(self, tokens: Tensor, offsets: Tensor, positions: Tensor, time_part: Tensor | None = None,
                max_len: int | None = None, read_summaries: list[Tensor] | None = None) -> Tensor:
        """``read_summaries``: if a list, it receives the summary states ``[Ts, dim]`` entering every ksa
        layer but the first (the only ones whose keys carry chunk content: at the first layer a summary
        is still its slot embedding), rows in ``summary_index`` order."""
        # The layout is checked once here; every layer's op then skips the checks that sync a GPU.
        validate_offsets(offsets, tokens.shape[0])
        if max_len is None:
            max_len = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
        cos, sin = self.rope.tables(positions, tokens.dtype)
        layout = StreamLayout(offsets=offsets, max_len=max_len, positions=positions, cos=cos, sin=sin)
        x, xs = self.input_dropout(tokens), None
        if self.with_summaries:
            k, S = self.cfg.chunk_size, self.cfg.summary_tokens
            user, chunk, slot = summary_index(offsets, k, S)
            xs = self.summary_inputs(chunk, slot, offsets[user] + chunk * k + k - 1, time_part)
            # A summary takes the position of an event of its chunk: the rotary tables are that event's.
            rows = offsets[user] + summary_position(chunk, slot, k, S)
            layout.sum_cos, layout.sum_sin = cos[rows], sin[rows]
            xs = self.input_dropout(xs)
        for i, block in enumerate(self.blocks):
            if read_summaries is not None and i > 0 and block.attn.reads_summaries:
                read_summaries.append(xs)
            x, xs = block(x, xs, layout)
        return self.final_norm(x)

    # ---- streaming -----------------------------------------------------------------------------------------
    def empty_states(self, batch: int, dtype: torch.dtype, device) -> list:
        """One streaming state per block for ``batch`` users with no events."""
        return share_layouts([block.attn.empty_state(batch, dtype, device) for block in self.blocks])

    def stack_states(self, users: list[list[dict[str, Tensor]]], device=None) -> list:
        """Per-user state tensors (``users[u][layer]``) -> one batched state per block, on ``device`` (None:
        where the tensors are). Layers that keep the same rows share their index tensors (``share_layouts``)."""
        states = share_layouts([block.attn.stack_states([u[i] for u in users]) for i, block in enumerate(self.blocks)])
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
            states: one state per block for these B users (``empty_states`` / ``stack_states``).
        Returns:
            ``(states of the new events (sum_b t_b, dim) after the final norm, updated states)``.
        """
        k, S = self.cfg.chunk_size, self.cfg.summary_tokens
        n = tokens.shape[0]
        seg = segment_ids(offsets, n)
        positions = event_count[seg] + torch.arange(n, device=tokens.device) - offsets[seg]
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
            x = torch.cat([tokens, self.summary_inputs(chunk, slot, rows, time_part)])
        cos, sin = self.rope.tables(stream_positions, tokens.dtype)
        next_index = event_count + offsets[1:] - offsets[:-1]
        sl = StepLayout(StepTokens.build(offsets, positions, sum_offsets, sum_ids, next_index), cos, sin,
                        self.with_summaries)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.step(x, sl, state)
            new_states.append(state)
        return self.final_norm(x[:n]), new_states
