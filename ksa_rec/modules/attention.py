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

from torch import Tensor, nn

from ksa_rec.models.config import EncoderConfig
from ksa_rec.modules.rope import apply_rotary
from ksa_rec.ops.causal import causal_attention
from ksa_rec.ops.ksa import ksa_attention
from ksa_rec.ops.swa import sliding_window_attention


@dataclass
class StreamLayout:
    """Where the tokens of a jagged batch sit; shared by every layer of one forward pass.

    ``offsets [B+1]`` and rotary tables ``cos, sin [T, 1, Dh/2]`` for events; the ``sum_*`` fields
    describe the summary stream (``None`` when the encoder has none).
    """

    offsets: Tensor
    max_len: int
    cos: Tensor
    sin: Tensor
    sum_cos: Tensor | None = None
    sum_sin: Tensor | None = None


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
