"""RMSNorm, optionally fused with the residual add before it: ``s = x + residual; y = rmsnorm(s) * weight``.

Two peers behind one dispatcher (``add_rms_norm``): plain torch (``F.rms_norm``, every device: what
``nn.RMSNorm`` computes) and a Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``) that does the
add and the norm in one pass, reading and writing each tensor in its own dtype with float32 math, and,
backward, the input gradient and a deterministic weight gradient in one more. Why a kernel: at recsys
widths (dim 64) and 1K events a user a training step spent more device time in the norms than in attention,
most of it in torch's weight-gradient kernel, slow for a tall, narrow input (``docs/results/training-speed.md``).
Which one runs follows the attention rule (``ksa_rec.ops.backend.resolve_fused_backend``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.ops.backend import resolve_fused_backend


def add_rms_norm(x: Tensor, weight: Tensor, eps: float | None = None, residual: Tensor | None = None,
                 backend: str | None = None) -> tuple[Tensor, Tensor]:
    """``x [..., D]`` (+ ``residual [..., D]``) -> ``(s, y)``: ``s = x + residual`` in the dtype torch's add
    gives (``x`` itself without a residual) and ``y = s / rms(s) * weight`` in ``s``'s dtype, computed in
    float32. ``eps`` None: ``torch.finfo(s.dtype).eps``, as ``nn.RMSNorm``."""
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    eps = torch.finfo(dtype).eps if eps is None else eps
    if resolve_fused_backend(backend, x.device, dtype, "norm") == "triton":
        from ksa_rec.ops.norm.triton_norm import add_rms_norm_triton
        return add_rms_norm_triton(x, weight, eps, residual)
    return add_rms_norm_reference(x, weight, eps, residual)


def add_rms_norm_reference(x: Tensor, weight: Tensor, eps: float,
                           residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch peer: the residual add, then ``F.rms_norm`` (under autocast it runs in float32, as
    ``nn.RMSNorm`` does)."""
    s = x if residual is None else x + residual
    return s, F.rms_norm(s, (s.shape[-1],), weight, eps)


__all__ = ["add_rms_norm", "add_rms_norm_reference"]
