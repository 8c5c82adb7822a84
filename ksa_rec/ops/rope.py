"""Rotary position embedding (RoPE) on absolute event indices.

RoPE makes attention scores depend only on position differences, so a model trained on histories cut
to ``max_len`` events scores longer histories (and a streaming state keyed by absolute indices) the same
way. Angles are reduced modulo 2*pi in float64 before the cast: at index 10^6 a float32 angle would be
off by ~0.1 rad.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Precomputes nothing: tables depend on the positions of each batch (histories are unbounded)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``positions [N]`` int64 -> ``(cos, sin)`` each ``[N, 1, head_dim/2]`` in ``dtype``."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq.to(positions.device)[None, :]
        angles = torch.remainder(angles, 2 * math.pi)
        return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [N, H, D]`` by the tables from ``RotaryEmbedding.tables`` (half-split convention).

    The result keeps ``x``'s dtype: under autocast q/k come out of the projections in bf16 while the
    tables are float32, and q, k and v must reach the attention op in one dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
