"""Which implementation runs an attention op: one rule for training, streaming and scoring.

Backends: ``"torch"`` (plain torch, every device: the CPU path), ``"flex"`` (FlexAttention, training
only), ``"triton"`` (ksa_rec's fused kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``).

``requested=None`` (auto) picks, for inputs on a CUDA device in fp16/bf16/fp32, Triton if it imports,
else Flex for training and torch for the streaming step; torch on any other device. A Triton that fails
to import in auto mode is logged once with the reason. An explicit backend that cannot run raises a
one-line ``BackendError``. Streaming has no Flex form: ``"flex"`` there means its masked torch peer.
Every distinct decision is logged once at DEBUG level (``ksa_rec.ops.backend``), which is how tests and
users see what ran.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from ksa_rec.errors import BackendError

BACKENDS = ("torch", "flex", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FORMS = ("train", "step")

log = logging.getLogger(__name__)


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype, form: str = "train") -> str:
    """The backend that runs an op of ``form`` ("train": the differentiable op over whole histories;
    "step": the cached op of the streaming step) on inputs on ``device`` in ``dtype``."""
    if requested is not None and requested not in BACKENDS:
        raise BackendError(f"attention backend must be null (auto) or one of {', '.join(BACKENDS)}, got {requested!r}")
    chosen = _auto(device, dtype, form) if requested is None else _explicit(requested, device, dtype, form)
    _log_once(form, requested, device.type, chosen)
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


def _explicit(requested: str, device: torch.device, dtype: torch.dtype, form: str) -> str:
    if requested == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError(f"attention backend 'triton' needs a CUDA device, got {device} (set "
                               "TRITON_INTERPRET=1 to run the kernels on CPU)")
        if dtype not in TRITON_DTYPES:
            raise BackendError(f"attention backend 'triton' supports {', '.join(map(str, TRITON_DTYPES))}, got {dtype}")
        problem = triton_import_error()
        if problem is not None:
            raise BackendError(f"attention backend 'triton' is unavailable: {problem}")
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


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _log_once(form: str, requested: str | None, device: str, chosen: str) -> None:
    log.debug("%s attention on %s: backend %s (requested %s)", form, device, chosen, requested or "auto")


__all__ = ["BACKENDS", "FORMS", "resolve_backend", "triton_import_error"]
