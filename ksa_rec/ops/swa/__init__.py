"""Token sliding-window attention (SWA), the ``swa`` baseline: event i sees events ``i - w .. i``.

Backends: ``"torch"`` (blockwise reference, the CPU path) and ``"flex"`` (FlexAttention, GPU; CPU
forward only). ``backend=None`` picks ``"flex"`` on CUDA and ``"torch"`` elsewhere. Both reuse the KSA
machinery with ``chunk_size = 1`` (``reference`` explains why that is exact).
"""

from __future__ import annotations

from torch import Tensor

from ksa_rec.ops.ksa.checks import check_backend, check_event_inputs, check_int, check_scale
from ksa_rec.ops.swa.flex import sliding_window_attention_flex
from ksa_rec.ops.swa.reference import sliding_window_attention_torch

BACKENDS = ("torch", "flex")
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
        backend: None (auto), ``"torch"`` or ``"flex"``.
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
    if q.shape[0] == 0:
        return q[:0].clone()
    name = backend or ("flex" if q.device.type == "cuda" else "torch")
    run = sliding_window_attention_flex if name == "flex" else sliding_window_attention_torch
    return run(q, k, v, offsets, window_tokens=window_tokens, scale=scale)


__all__ = ["BACKENDS", "sliding_window_attention"]
