"""Per-layer K/V kept for streaming, jagged over a batch of users (KSA.md section 7).

Each cached row carries its identity, so what a layer keeps is decided by one rule per kind and the
attention never depends on the order or the amount kept:

- event rows: K (RoPE applied) and V of past events, with their absolute event index;
- summary rows: K/V of summary tokens, with their summary id ``c*S + j``.

Example, k = 4, W = 1, one ksa layer, a user after 13 events (chunks 0, 1, 2 complete, event 12 open)::

    events kept    | e8 e9 e10 e11 e12 |      (chunk 3 - W = 2 onwards: the ring)
    summaries kept | s0 s1 s2         |      (all complete chunks; max_summaries bounds them)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ksa_rec.utils.jagged import jagged_append, jagged_keep, lengths_to_offsets


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

    def append(self, k: Tensor, v: Tensor, idx: Tensor, offsets: Tensor, sk: Tensor, sv: Tensor,
               sidx: Tensor, s_offsets: Tensor) -> "LayerCache":
        """Each user's new rows after its old ones (new offsets are ``[B+1]`` of the new rows)."""
        kk, off = jagged_append(self.k, self.offsets, k, offsets)
        vv, _ = jagged_append(self.v, self.offsets, v, offsets)
        ii, _ = jagged_append(self.idx, self.offsets, idx, offsets)
        skk, soff = jagged_append(self.sk, self.s_offsets, sk, s_offsets)
        svv, _ = jagged_append(self.sv, self.s_offsets, sv, s_offsets)
        sii, _ = jagged_append(self.sidx, self.s_offsets, sidx, s_offsets)
        return LayerCache(kk, vv, ii, off, skk, svv, sii, soff)

    def keep(self, event_keep: Tensor, summary_keep: Tensor) -> "LayerCache":
        """Only the rows where the masks (``[sum m_b]``, ``[sum s_b]`` bool) are True."""
        return LayerCache(self.k[event_keep], self.v[event_keep], self.idx[event_keep],
                          jagged_keep(self.offsets, event_keep), self.sk[summary_keep], self.sv[summary_keep],
                          self.sidx[summary_keep], jagged_keep(self.s_offsets, summary_keep))

    def to(self, device) -> "LayerCache":
        return LayerCache(*(getattr(self, f.name).to(device) for f in fields(self)))

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
