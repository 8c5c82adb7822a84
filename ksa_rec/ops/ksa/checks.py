"""Input validation of the attention ops: every problem is one ``ValueError`` line naming the argument.

Checks run before any backend, so a backend may assume well-formed input. They read ``offsets`` on the
host (a device sync on CUDA), which the summary-stream length check needs anyway.
"""

from __future__ import annotations

import math

from torch import Tensor

from ksa_rec.ops.ksa.layout import num_chunks
from ksa_rec.ops.ksa.rule import KsaRule
from ksa_rec.utils.jagged import offsets_to_lengths, validate_offsets


def check_scale(op: str, scale) -> None:
    """``scale`` is ``None`` (use ``D**-0.5``) or a finite real number."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}")


def check_backend(op: str, backend, allowed: tuple[str, ...]) -> None:
    """``backend`` is ``None`` (auto) or one of ``allowed``."""
    if backend is not None and backend not in allowed:
        raise ValueError(f"{op}: backend must be None (auto) or one of {allowed}, got {backend!r}")


def _check_stream(op: str, name: str, x, ref: Tensor | None) -> None:
    """``x`` is a 3-D floating tensor ``[rows, heads, D]`` on ``ref``'s device with ``ref``'s dtype."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must have shape [rows, heads, head_dim], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
    if ref is not None and x.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} has dtype {x.dtype}, but q has {ref.dtype}")
    if ref is not None and x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device}, but q is on {ref.device}")


def _check_shape(op: str, name: str, x: Tensor, rows: int, heads: int, dim: int, what: str) -> None:
    if tuple(x.shape) != (rows, heads, dim):
        raise ValueError(f"{op}: {name} must have shape {(rows, heads, dim)} ({what}), got {tuple(x.shape)}")


def check_event_inputs(op: str, q, k, v, offsets, check_offsets: bool = True) -> None:
    """Event stream ``q [T, H, D]``, ``k, v [T, Hkv, D]`` with ``H % Hkv == 0``, and ``offsets [B+1]``.

    ``check_offsets=False`` skips the checks that read offsets' values (device syncs on a GPU); callers
    that validated the batch layout once pass it for every layer."""
    _check_stream(op, "q", q, None)
    _check_stream(op, "k", k, q)
    _check_stream(op, "v", v, q)
    total, heads, dim = q.shape
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{op}: k has {kv_heads} heads, which must divide q's {heads} heads (GQA)")
    _check_shape(op, "k", k, total, kv_heads, dim, "rows and head_dim of q")
    _check_shape(op, "v", v, total, kv_heads, dim, "same as k")
    if not isinstance(offsets, Tensor):
        raise ValueError(f"{op}: offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.device != q.device:
        raise ValueError(f"{op}: offsets is on {offsets.device}, but q is on {q.device}")
    if not check_offsets:
        return
    try:
        validate_offsets(offsets, total, name="offsets")
    except ValueError as err:
        raise ValueError(f"{op}: {err}") from None


def check_ksa_inputs(q, k, v, q_sum, k_sum, v_sum, offsets, rule, *, scale, op: str = "ksa_attention",
                     check_offsets: bool = True) -> None:
    """Validate the full contract of ``ksa_attention`` (see there); raise a one-line ``ValueError``."""
    if not isinstance(rule, KsaRule):
        raise ValueError(f"{op}: rule must be a KsaRule, got {type(rule).__name__}")
    check_scale(op, scale)
    check_event_inputs(op, q, k, v, offsets, check_offsets)
    for name, x in (("q_sum", q_sum), ("k_sum", k_sum), ("v_sum", v_sum)):
        _check_stream(op, name, x, q)
    if not check_offsets:
        return
    expected = int((rule.summary_tokens * num_chunks(offsets_to_lengths(offsets.long()), rule.chunk_size)).sum())
    what = "summary_tokens * sum(n_b // chunk_size) rows, heads of q/k"
    _check_shape(op, "q_sum", q_sum, expected, q.shape[1], q.shape[2], what)
    _check_shape(op, "k_sum", k_sum, expected, k.shape[1], q.shape[2], what)
    _check_shape(op, "v_sum", v_sum, expected, k.shape[1], q.shape[2], what)
