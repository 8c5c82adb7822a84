"""The sequence encoder: pre-norm blocks [norm -> attention(kind) -> norm -> FFN], one kind per layer.

With any ``ksa`` layer in the pattern, a summary stream runs beside the events (KSA.md section 4):
``S`` learned slot embeddings (plus the time part of the chunk's last event) enter after every complete
chunk, share norms, output projections and FFNs with the events, and are dropped at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ksa_rec.models.config import EncoderConfig
from ksa_rec.modules.attention import KindAttention, StreamLayout
from ksa_rec.modules.rope import RotaryEmbedding
from ksa_rec.ops.ksa.layout import summary_event_positions, summary_index
from ksa_rec.utils.jagged import validate_offsets


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim))


class Block(nn.Module):
    """One pre-norm transformer block; events and summaries share everything but Q/K/V projections."""

    def __init__(self, kind: str, cfg: EncoderConfig, with_summaries: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = KindAttention(kind, cfg, with_summaries)
        self.ffn_norm = nn.RMSNorm(cfg.dim)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_mult, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, xs: Tensor | None, layout: StreamLayout) -> tuple[Tensor, Tensor | None]:
        a, a_sum = self.attn(self.attn_norm(x), None if xs is None else self.attn_norm(xs), layout)
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

    def summary_inputs(self, offsets: Tensor, time_part: Tensor | None) -> tuple[Tensor, Tensor]:
        """Summary-stream input tokens ``[Ts, dim]`` and the event rows whose positions they take ``[Ts]``."""
        cfg = self.cfg
        user, _, slot = summary_index(offsets, cfg.chunk_size, cfg.summary_tokens)
        rows = offsets[user] + summary_event_positions(offsets, cfg.chunk_size, cfg.summary_tokens)
        xs = self.summary_embedding[slot]
        if time_part is not None:
            xs = xs + time_part[rows]
        return xs, rows

    def forward(self, tokens: Tensor, offsets: Tensor, positions: Tensor, time_part: Tensor | None = None,
                max_len: int | None = None) -> Tensor:
        # The layout is checked once here; every layer's op then skips the checks that sync a GPU.
        validate_offsets(offsets, tokens.shape[0])
        if max_len is None:
            max_len = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
        cos, sin = self.rope.tables(positions, tokens.dtype)
        layout = StreamLayout(offsets=offsets, max_len=max_len, cos=cos, sin=sin)
        x, xs = self.input_dropout(tokens), None
        if self.with_summaries:
            xs, rows = self.summary_inputs(offsets, time_part)
            layout.sum_cos, layout.sum_sin = cos[rows], sin[rows]
            xs = self.input_dropout(xs)
        for block in self.blocks:
            x, xs = block(x, xs, layout)
        return self.final_norm(x)
