"""Kwai Summary Attention (KSA.md): one dispatcher over three peer backends.

* ``"torch"``  -- ``reference.ksa_attention_torch``: readable, blockwise (no ``T x T`` mask), the CPU path.
* ``"flex"``   -- ``flex.ksa_attention_flex``: FlexAttention with the KSA ``mask_mod`` (GPU; CPU: forward).
* ``"triton"`` -- ``triton_op.ksa_attention_triton``: fused kernels, imported lazily (CUDA, or CPU under
  ``TRITON_INTERPRET=1``).

``backend=None`` picks: CUDA -> ``"triton"`` if it imports and supports the dtype (fp16/bf16/fp32), else
``"flex"``; any other device -> ``"torch"``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from ksa_rec.ops.ksa.checks import check_backend, check_ksa_inputs
from ksa_rec.ops.ksa.flex import ksa_attention_flex
from ksa_rec.ops.ksa.reference import ksa_attention_torch

BACKENDS = ("torch", "flex", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels compute in


def ksa_attention(q: Tensor, k: Tensor, v: Tensor, q_sum: Tensor, k_sum: Tensor, v_sum: Tensor,
                  offsets: Tensor, *, chunk_size: int, window: int | None, summary_tokens: int = 1,
                  scale: float | None = None, backend: str | None = None,
                  max_summaries: int | None = None, check_offsets: bool = True) -> tuple[Tensor, Tensor]:
    """Kwai Summary Attention over a jagged batch of users (KSA.md section 3), differentiable.

    Two jagged streams (KSA.md section 5). Example, k = 2, S = 1, lengths (5, 1)::

        q, k, v              | t0 t1 t2 t3 t4 | u0 |    offsets         = [0, 5, 6]
        q_sum, k_sum, v_sum  | s0    s1       |    |    summary offsets = [0, 2, 2]

    Args:
        q: ``(sum_b n_b, H, D)`` event queries (positional encoding already applied by the caller).
        k, v: ``(sum_b n_b, Hkv, D)`` event keys / values; ``H % Hkv == 0`` (GQA: head h reads h // (H/Hkv)).
        q_sum: ``(sum_b S*(n_b//k), H, D)`` summary queries, user b's rows consecutive, chunk-major then
            slot (row ``c*S + j`` of a user is ``s_{c,j}``).
        k_sum, v_sum: ``(sum_b S*(n_b//k), Hkv, D)`` summary keys / values, same layout.
        offsets: int64 ``[B+1]``, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == T``.
        chunk_size: k >= 1 events per chunk.
        window: W >= 0 chunks seen raw before the query's own chunk, or None for a full layer (events see
            every earlier event and no summary; summaries still read their own chunk).
        summary_tokens: S >= 0 per complete chunk (``k % S == 0``); 0 = no summary stream (``sca``).
        scale: softmax scale, default ``D ** -0.5``.
        backend: None (auto, module docstring), ``"torch"``, ``"flex"`` or ``"triton"``.
        max_summaries: M: an event sees only the summaries of chunks ``c(i)-W-M <= c < c(i)-W``;
            None = all older ones.
        check_offsets: False skips the checks that read the values of ``offsets`` (and the summary row
            count derived from them): they sync a GPU. For callers that validated the layout already.

    Returns:
        ``(out (sum_b n_b, H, D), out_sum (sum_b S*(n_b//k), H, D))`` in the dtype of q.

    Raises:
        ValueError: one line naming the bad argument (shapes, dtypes, devices, offsets, ints).
        ImportError: ``backend="triton"`` when ``ksa_rec.ops.ksa.triton_op`` cannot be imported.
    """
    check_ksa_inputs(q, k, v, q_sum, k_sum, v_sum, offsets, chunk_size=chunk_size, window=window,
                     summary_tokens=summary_tokens, scale=scale, max_summaries=max_summaries,
                     check_offsets=check_offsets)
    check_backend("ksa_attention", backend, BACKENDS)
    name = resolve_backend(backend, q.device, q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[0] == 0:  # no events (B = 0 or only empty users): nothing to launch on any backend
        return q[:0].clone(), q_sum[:0].clone()
    return backend_function(name)(q, k, v, q_sum, k_sum, v_sum, offsets, chunk_size=chunk_size,
                                  window=window, summary_tokens=summary_tokens, scale=scale,
                                  max_summaries=max_summaries)


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend for inputs on ``device`` in ``dtype``: the auto rule (module docstring) for None,
    else ``backend`` itself once it is known to be usable there."""
    if backend is None:
        if device.type != "cuda":
            return "torch"
        return "triton" if dtype in TRITON_DTYPES and triton_available() else "flex"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"ksa_attention: backend='triton' needs CUDA tensors, got q on {device} "
                         "(set TRITON_INTERPRET=1 to run the kernels on CPU)")
    return backend


def backend_function(name: str):
    """The function behind a backend name; ``"triton"`` is imported here, on first use."""
    if name == "torch":
        return ksa_attention_torch
    if name == "flex":
        return ksa_attention_flex
    try:
        return _import_triton()
    except ImportError as err:
        raise ImportError(f"ksa_attention: backend='triton' is unavailable: importing "
                          f"ksa_rec.ops.ksa.triton_op failed ({err})") from err


@functools.cache
def triton_available() -> bool:
    """Whether the Triton backend imports (cached for the process: auto mode asks on every call)."""
    try:
        _import_triton()
    except ImportError:
        return False
    return True


def _import_triton():
    from ksa_rec.ops.ksa.triton_op import ksa_attention_triton

    return ksa_attention_triton


__all__ = ["BACKENDS", "backend_function", "ksa_attention", "resolve_backend", "triton_available"]
