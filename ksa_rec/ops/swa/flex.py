"""FlexAttention SWA: the KSA flex backend with ``chunk_size = 1`` and no summaries (see ``reference``)."""

from __future__ import annotations

from torch import Tensor

from ksa_rec.ops.ksa.flex import ksa_attention_flex
from ksa_rec.ops.swa.reference import swa_via_ksa


def sliding_window_attention_flex(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, *, window_tokens: int,
                                  scale: float | None = None) -> Tensor:
    """SWA with FlexAttention (GPU; CPU forward only). Shapes as ``sliding_window_attention``."""
    return swa_via_ksa(ksa_attention_flex, q, k, v, offsets, window_tokens=window_tokens, scale=scale)
