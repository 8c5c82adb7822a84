"""Which implementation runs an attention op: one rule for training, streaming and scoring.

Backends: ``"torch"`` (plain torch, every device: the CPU path), ``"flex"`` (FlexAttention, training
only), ``"triton"`` (ksa_rec's fused kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``).

``requested=None`` (auto) picks, for inputs on a CUDA device in fp16/bf16/fp32, Triton if it imports,
else Flex for training and torch for the streaming step; torch on any other device. A Triton that fails
to import in auto mode is logged once with the reason. An explicit backend that cannot run raises a
one-line ``BackendError``. Streaming has no Flex form: ``"flex"`` there means its masked torch peer.
Every distinct decision is logged once at DEBUG level (``ksa_rec.ops.backend``), which is how tests and
users see what ran.

Full causal attention without summaries (``ksa_rec.ops.causal``, the ``full`` layer of summary-free
patterns) has its own rule, ``resolve_full_path``: the dense fused kernels where no row is padding, a
jagged kernel where users differ in length (padding a batch to its longest user does work on rows that
do not exist: 1.9x the events of a 128-user ML-1M batch at length 200, 6.8x over whole histories).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch

from ksa_rec.errors import BackendError

BACKENDS = ("torch", "flex", "triton")
FULL_PATHS = ("dense", "varlen", "ksa", "padded")
HALF_DTYPES = (torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FORMS = ("train", "step")

log = logging.getLogger(__name__)


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype, form: str = "train",
                    what: str = "attention") -> str:
    """The backend that runs an op of ``form`` ("train": the differentiable op over whole histories;
    "step": the cached op of the streaming step) on inputs on ``device`` in ``dtype``; ``what`` names the op
    in errors."""
    if requested is not None and requested not in BACKENDS:
        raise BackendError(f"{what} backend must be null (auto) or one of {', '.join(BACKENDS)}, got {requested!r}")
    chosen = _auto(device, dtype, form) if requested is None else _explicit(requested, device, dtype, form, what)
    _log_once(form if what == "attention" else what, requested, device.type, chosen, what)
    return chosen


def _auto(device: torch.device, dtype: torch.dtype, form: str) -> str:
    if device.type != "cuda":
        return "torch"
    if dtype not in TRITON_DTYPES:
        return "flex" if form == "train" else "torch"
    problem = triton_import_error()
    if problem is None:
        return "triton"
    fallback = "flex" if form == "train" else "torch"
    _warn_once(f"Triton kernels unavailable ({problem}); the {form} path runs on {fallback}")
    return fallback


def _explicit(requested: str, device: torch.device, dtype: torch.dtype, form: str, what: str) -> str:
    if requested == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError(f"{what} backend 'triton' needs a CUDA device, got {device} (set "
                               "TRITON_INTERPRET=1 to run the kernels on CPU)")
        if dtype not in TRITON_DTYPES:
            raise BackendError(f"{what} backend 'triton' supports {', '.join(map(str, TRITON_DTYPES))}, got {dtype}")
        problem = triton_import_error()
        if problem is not None:
            raise BackendError(f"{what} backend 'triton' is unavailable: {problem}")
    if requested == "flex" and form == "step":
        return "torch"
    return requested


@functools.cache
def triton_import_error() -> str | None:
    """Why the Triton kernels do not import (None when they do); asked once per process."""
    try:
        import ksa_rec.ops.ksa.triton_cached  # noqa: F401
        import ksa_rec.ops.ksa.triton_op  # noqa: F401
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def resolve_fused_backend(requested: str | None, device: torch.device, dtype: torch.dtype, what: str) -> str:
    """torch or triton for the fused non-attention ops (``ksa_rec.ops.norm``, ``ksa_rec.ops.xent``; ``what``
    names one in errors): ``resolve_backend``'s rule for training (Triton on CUDA where it imports, torch
    elsewhere; an explicit Triton that cannot run raises), with no Flex form."""
    if requested == "flex":
        raise BackendError(f"{what} backend must be null (auto), torch or triton, got 'flex'")
    chosen = resolve_backend(requested, device, dtype, "train", what=what)
    return "torch" if chosen == "flex" else chosen


def resolve_full_path(device: torch.device, dtype: torch.dtype, rows: int, batch: int, max_len: int,
                      head_dim: int, same_heads: bool, requested: str | None = None) -> str:
    """How causal attention over ``batch`` users (``rows`` events, the longest ``max_len``) runs:

    - ``"dense"``: every user has ``max_len`` events: SDPA on a view, its own backend choice (cuDNN or
      flash on Hopper), no copy;
    - ``"varlen"``: CUDA, fp16/bf16, users of different lengths: FlashAttention's varlen kernel
      (``torch.nn.attention.varlen``) on the jagged rows, no padding;
    - ``"ksa"``: CUDA in fp32 (no varlen kernel takes it), or a varlen kernel that cannot run here: the KSA
      op's full rule, jagged, on Triton (head dims up to 128; not when ``requested``, the layer's attention
      backend, names another one);
    - ``"padded"``: otherwise (CPU): right-pad to ``max_len`` and SDPA with ``is_causal``.
    """
    if rows == batch * max_len:
        chosen = "dense"
    elif device.type != "cuda":
        chosen = "padded"
    elif dtype in HALF_DTYPES and same_heads and head_dim % 8 == 0 and head_dim <= 256 and varlen_causal_kwargs():
        chosen = "varlen"
    elif requested in (None, "triton") and head_dim <= 128 and resolve_backend(requested, device, dtype) == "triton":
        chosen = "ksa"
    else:
        chosen = "padded"
    _log_once("full causal", requested, device.type, chosen)
    return chosen


@functools.cache
def varlen_causal_kwargs() -> dict | None:
    """The causal flag of ``torch.nn.attention.varlen.varlen_attn`` in this torch (``is_causal=True`` in
    2.10-2.11, ``window_size=(-1, 0)`` later); None where the module does not import."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        return {"is_causal": True}
    return {"window_size": (-1, 0)} if "window_size" in params else None


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _log_once(form: str, requested: str | None, device: str, chosen: str, what: str = "attention") -> None:
    """``form`` names the decision ("train" / "step" attention, "full causal", or a fused op's name)."""
    label = f"{form} attention" if what == "attention" else form
    log.debug("%s on %s: backend %s (requested %s)", label, device, chosen, requested or "auto")


__all__ = ["BACKENDS", "FORMS", "FULL_PATHS", "resolve_backend", "resolve_full_path", "resolve_fused_backend",
           "triton_import_error", "varlen_causal_kwargs"]
