"""Token sliding-window attention (SWA), the ``swa`` baseline: event i sees events ``i - w .. i``.

SWA is a special case of KSA: ``KsaRule(chunk_size=1, window=w, summary_tokens=0)`` (every event its own
chunk, no summaries) is exactly the token window, so it runs on every KSA backend (torch, flex, triton)
through ``ksa_attention``.
"""

from __future__ import annotations

from torch import Tensor

from ksa_rec.ops.ksa import BACKENDS, KsaRule, ksa_attention
from ksa_rec.ops.ksa.checks import check_backend, check_event_inputs, check_scale
from ksa_rec.utils.config import check_int

_OP = "sliding_window_attention"


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, *, window_tokens: int,
                             scale: float | None = None, backend: str | None = None,
                             check_offsets: bool = True) -> Tensor:
    """Causal sliding-window attention over a jagged batch, differentiable.

    Event i of a user sees event j of the same user iff ``0 <= i - j <= window_tokens`` (the model uses
    ``window_tokens = window * chunk_size``). Example, lengths (3, 1)::

        q, k, v | a0 a1 a2 | b0 |    offsets = [0, 3, 4]

    Args:
        q: ``(sum_b n_b, H, D)``; k, v: ``(sum_b n_b, Hkv, D)`` with ``H % Hkv == 0`` (GQA).
        offsets: int64 ``[B+1]``.
        window_tokens: w >= 0 earlier events seen besides the event itself.
        scale: softmax scale, default ``D ** -0.5``.
        backend: as for ``ksa_attention``: None (auto), ``"torch"``, ``"flex"`` or ``"triton"``.
        check_offsets: False skips reading the values of ``offsets`` (a GPU sync); see ``ksa_attention``.

    Returns:
        ``(sum_b n_b, H, D)`` in the dtype of q.

    Raises:
        ValueError: one line naming the bad argument.
    """
    check_int(_OP, "window_tokens", window_tokens, minimum=0)
    check_scale(_OP, scale)
    check_backend(_OP, backend, BACKENDS)
    check_event_inputs(_OP, q, k, v, offsets, check_offsets)
    no_queries, no_keys = q.new_zeros((0, *q.shape[1:])), k.new_zeros((0, *k.shape[1:]))
    out, _ = ksa_attention(q, k, v, no_queries, no_keys, no_keys, offsets, KsaRule(1, window_tokens, 0), scale=scale,
                           backend=backend, check_offsets=False)
    return out


__all__ = ["BACKENDS", "sliding_window_attention"]
