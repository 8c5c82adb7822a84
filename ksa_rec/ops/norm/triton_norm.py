"""Triton kernels of ``add_rms_norm`` and their autograd Function (contract: ``add_rms_norm_reference``).

Forward, one pass: ``s = x + residual`` (rounded to its dtype), ``rstd = 1 / sqrt(mean(s^2) + eps)``,
``y = s * rstd * weight`` in ``s``'s dtype; ``rstd`` [N] fp32 is kept for backward. Backward, one
pass: ``dx = rstd * (dy*w - s*rstd * mean(dy*w * s*rstd)) (+ ds)`` and per-program partial sums of
``dy * s*rstd`` that one ``sum`` reduces to the weight gradient, in a fixed order (deterministic: no
atomics). Each program owns ``BLOCK_M`` whole rows. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_TILE_ELEMENTS = 4096  # rows per program * padded width: enough work per program at dim 64 and 256


@triton.jit
def _add_rms_norm_fwd_kernel(X, R, S, Y, W, RSTD, n_rows, dim, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < dim)[None, :]
    at = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    s = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = s + tl.load(R + at, mask=mask, other=0.0).to(tl.float32)
        s_stored = s.to(S.dtype.element_ty)
        tl.store(S + at, s_stored, mask=mask)
        s = s_stored.to(tl.float32)  # the norm reads the sum as stored, as the torch peer does
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / dim + eps)
    w = tl.load(W + cols, mask=cols < dim, other=0.0).to(tl.float32)
    tl.store(Y + at, (s * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, DS, S, W, RSTD, DX, DW_PART, n_rows, dim,
                         HAS_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    at = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    s = tl.load(S + at, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + at, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    s_hat = s * rstd[:, None]
    w_dy = dy * w[None, :]
    mean_dot = tl.sum(s_hat * w_dy, axis=1) / dim
    dx = (w_dy - s_hat * mean_dot[:, None]) * rstd[:, None]
    if HAS_DS:
        dx = dx + tl.load(DS + at, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + at, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * dim + cols, tl.sum(dy * s_hat, axis=0), mask=col_ok)


def _tiles(n_rows: int, dim: int) -> tuple[int, int, int]:
    """(rows per program, padded width, programs)."""
    block_d = triton.next_power_of_2(dim)
    block_m = max(1, min(_TILE_ELEMENTS // block_d, triton.next_power_of_2(max(n_rows, 1))))
    return block_m, block_d, triton.cdiv(n_rows, block_m)


def _forward(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    n_rows, dim = x.shape
    s = x if residual is None else torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype),
                                               device=x.device)
    y = torch.empty_like(s)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_m, block_d, programs = _tiles(n_rows, dim)
    if n_rows:
        _add_rms_norm_fwd_kernel[(programs,)](x, x if residual is None else residual, s, y, weight, rstd, n_rows,
                                              dim, eps, HAS_RESIDUAL=residual is not None, BLOCK_M=block_m,
                                              BLOCK_D=block_d, num_warps=4)
    return s, y, rstd


def _backward(dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    n_rows, dim = s.shape
    block_m, block_d, programs = _tiles(n_rows, dim)
    dx = torch.empty_like(s)
    dw_part = torch.empty(programs, dim, dtype=torch.float32, device=s.device)
    if n_rows:
        _rms_norm_bwd_kernel[(programs,)](dy, s if ds is None else ds, s, weight, rstd, dx, dw_part, n_rows, dim,
                                          HAS_DS=ds is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return dx, dw_part.sum(0).to(weight.dtype)


class _AddRmsNorm(torch.autograd.Function):
    """``(x, residual, weight) -> (s, y)``."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, weight: Tensor, eps: float):
        s, y, rstd = _forward(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.input_dtypes = (x.dtype, residual.dtype)
        return s, y

    @staticmethod
    def backward(ctx, ds: Tensor | None, dy: Tensor | None):
        s, weight, rstd = ctx.saved_tensors
        dy = torch.zeros_like(s) if dy is None else dy.contiguous()
        dx, dw = _backward(dy, None if ds is None else ds.contiguous(), s, weight, rstd)
        x_dtype, residual_dtype = ctx.input_dtypes
        return dx.to(x_dtype), dx.to(residual_dtype), dw, None


class _RmsNorm(torch.autograd.Function):
    """``(x, weight) -> y``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float):
        _, y, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy.contiguous(), None, x, weight, rstd)
        return dx, dw, None


def add_rms_norm_triton(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``add_rms_norm`` on the Triton kernels; ``x``, ``residual`` ``[..., D]`` (flattened to rows)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if residual is None:
        y = _RmsNorm.apply(x2, weight, eps)
        return x, y.view(shape)
    r2 = residual.reshape(-1, shape[-1]).contiguous()
    s, y = _AddRmsNorm.apply(x2, r2, weight, eps)
    return s.view(shape), y.view(shape)


__all__ = ["add_rms_norm_triton"]
