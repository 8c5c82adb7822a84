"""The HSTU attention unit (Zhai et al., 2024, "Actions speak louder than words"), the ``hstu`` layer kind.

One projection gives U, V, Q, K, each through SiLU; the events attend to every earlier event of their user with
pointwise SiLU attention and a learned bias per head and distance (``ksa_rec.ops.pointwise``); the result is
layer-normed, gated by U and projected out. No rotary embedding: positions reach the layer through the bias
only, as in HSTU. (HSTU's time-difference bias is not here: the public files the benchmarks use carry no
timestamps, or only ratings' ones.) In ``SequenceEncoder`` the unit sits where the other kinds' attention sits,
so its block keeps the pre-norm, the residual and the FFN that HSTU's own layer does without.

Streaming state: every earlier event's K and V (a ``LayerCache`` with no summary rows), as for full attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ksa_rec.ops.ksa.step import LayerCache, join_rows, take
from ksa_rec.ops.pointwise import pointwise_attention
from ksa_rec.utils.config import require


@dataclass
class HstuConfig:
    """Settings of ``hstu`` layers (``model.encoder.hstu``)."""

    max_distance: int = 256
    """Entries of the learned bias by distance (events back); events further back share the last entry."""
    normalizer: float = 200.0
    """What the attention sum is divided by (HSTU divides by its training sequence length)."""

    def __post_init__(self) -> None:
        require(self.max_distance >= 1, "encoder.hstu.max_distance", f"must be >= 1, got {self.max_distance}")
        require(self.normalizer > 0, "encoder.hstu.normalizer", f"must be > 0, got {self.normalizer}")


class PointwiseUnit(nn.Module):
    """U/V/Q/K projection -> pointwise attention with a distance bias -> layer norm, gate by U -> output."""

    def __init__(self, dim: int, num_heads: int, cfg: HstuConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.cfg = num_heads, dim // num_heads, cfg
        self.uvqk = nn.Linear(dim, 4 * dim, bias=False)
        self.distance_bias = nn.Parameter(torch.randn(num_heads, cfg.max_distance) * 0.02)
        self.out = nn.Linear(dim, dim, bias=False)

    def _project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``h [N, dim]`` -> u ``[N, dim]``; v, q, k ``[N, H, Dh]``."""
        u, v, q, k = F.silu(self.uvqk(h)).chunk(4, dim=-1)
        shape = (h.shape[0], self.num_heads, self.head_dim)
        return u, v.reshape(shape), q.reshape(shape), k.reshape(shape)

    def _gate(self, attended: Tensor, u: Tensor) -> Tensor:
        attended = attended.flatten(1)
        return self.out(F.layer_norm(attended, attended.shape[-1:]) * u)

    def forward(self, h: Tensor, offsets: Tensor, positions: Tensor, max_len: int) -> Tensor:
        """The training pass: events ``h [T, dim]`` of a jagged batch (``offsets [B+1]``, absolute
        ``positions [T]``, longest user ``max_len``) -> ``[T, dim]``."""
        u, v, q, k = self._project(h)
        attended = pointwise_attention(q, k, v, offsets, positions, offsets, positions, self.distance_bias,
                                       normalizer=self.cfg.normalizer, max_q=max_len, max_k=max_len)
        return self._gate(attended, u)

    def step(self, h: Tensor, offsets: Tensor, positions: Tensor, state: LayerCache) -> tuple[Tensor, LayerCache]:
        """New events ``h [Tn, dim]`` (``offsets [B+1]``, absolute ``positions [Tn]``) against the cached events
        of their users -> (outputs ``[Tn, dim]``, the cache with the new events appended)."""
        u, v, q, k = self._project(h)
        idx, key_offsets, rows = join_rows(state.idx, state.offsets, positions, offsets)
        keys, values = take(torch.cat([state.k, k]), rows), take(torch.cat([state.v, v]), rows)
        attended = pointwise_attention(q, keys, values, offsets, positions, key_offsets, idx, self.distance_bias,
                                       normalizer=self.cfg.normalizer)
        none = keys[:0]
        return self._gate(attended, u), LayerCache(keys, values, idx, key_offsets, none, none, idx[:0],
                                                   torch.zeros_like(key_offsets))


__all__ = ["HstuConfig", "PointwiseUnit"]
