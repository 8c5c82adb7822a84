"""Triton kernels of ``sampled_cross_entropy`` and their autograd Function (contract:
``sampled_cross_entropy_reference``).

Forward: each program owns ``BLOCK_R`` rows and walks the ``M`` negatives in tiles of ``BLOCK_C``, keeping an
online max and sum of ``exp`` (as FlashAttention does over keys), started from the positive, so every row's
max is finite; it writes ``lse [N]`` (float32). Backward walks the same tiles once more and writes
``d neg_ij = g_i * exp(z_ij - lse_i) / T`` in ``neg``'s dtype; ``d pos`` is one ``[N]`` expression in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

_BLOCK_R = 16
_BLOCK_C = 128


@triton.jit
def _tile(NEG, IDS, LOG_COUNTS, rows, row_ok, target, c0, n_cols, temperature,
          HAS_COUNTS: tl.constexpr, BLOCK_C: tl.constexpr):
    """One tile's ``z`` (float32, -inf where masked) and the addresses of its elements."""
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    at = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    z = tl.load(NEG + at, mask=ok, other=0.0).to(tl.float32) / temperature
    if HAS_COUNTS:
        z = z - tl.load(LOG_COUNTS + cols, mask=col_ok, other=0.0)[None, :]
    ids = tl.load(IDS + cols, mask=col_ok, other=-1)
    keep = ok & (ids[None, :] != target[:, None])
    return tl.where(keep, z, float("-inf")), at, ok


@triton.jit
def _accumulate(NEG, IDS, LOG_COUNTS, rows, row_ok, target, c0, n_cols, temperature, running_max, running_sum,
                HAS_COUNTS: tl.constexpr, BLOCK_C: tl.constexpr):
    z, at, ok = _tile(NEG, IDS, LOG_COUNTS, rows, row_ok, target, c0, n_cols, temperature, HAS_COUNTS, BLOCK_C)
    new_max = tl.maximum(running_max, tl.max(z, axis=1))
    running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def _xent_fwd_kernel(POS, NEG, IDS, TARGETS, LOG_COUNTS, LSE, n_rows, n_cols, temperature,
                     HAS_COUNTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     INTERPRET: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    target = tl.load(TARGETS + rows, mask=row_ok, other=-1)
    running_max = tl.load(POS + rows, mask=row_ok, other=0.0).to(tl.float32) / temperature
    running_sum = tl.full((BLOCK_R,), 1.0, tl.float32)  # exp(pos - max) with max = pos
    # The CPU interpreter keeps scalars as 1-element arrays, which NumPy >= 2.4 refuses as range() bounds
    # (as in ksa_rec/ops/ksa/triton_fwd.py): a while loop there, a for loop on the GPU.
    if INTERPRET:
        c0 = 0
        while c0 < n_cols:
            running_max, running_sum = _accumulate(NEG, IDS, LOG_COUNTS, rows, row_ok, target, c0, n_cols,
                                                   temperature, running_max, running_sum, HAS_COUNTS, BLOCK_C)
            c0 += BLOCK_C
    else:
        for c0 in range(0, n_cols, BLOCK_C):
            running_max, running_sum = _accumulate(NEG, IDS, LOG_COUNTS, rows, row_ok, target, c0, n_cols,
                                                   temperature, running_max, running_sum, HAS_COUNTS, BLOCK_C)
    tl.store(LSE + rows, running_max + tl.log(running_sum), mask=row_ok)


@triton.jit
def _store_grad(NEG, IDS, LOG_COUNTS, DNEG, rows, row_ok, target, c0, n_cols, temperature, lse, scale,
                HAS_COUNTS: tl.constexpr, BLOCK_C: tl.constexpr):
    z, at, ok = _tile(NEG, IDS, LOG_COUNTS, rows, row_ok, target, c0, n_cols, temperature, HAS_COUNTS, BLOCK_C)
    grad = tl.exp(z - lse[:, None]) * scale[:, None]
    tl.store(DNEG + at, grad.to(DNEG.dtype.element_ty), mask=ok)


@triton.jit
def _xent_bwd_kernel(GRAD, LSE, NEG, IDS, TARGETS, LOG_COUNTS, DNEG, n_rows, n_cols, temperature,
                     HAS_COUNTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     INTERPRET: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    target = tl.load(TARGETS + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    scale = tl.load(GRAD + rows, mask=row_ok, other=0.0) / temperature
    if INTERPRET:
        c0 = 0
        while c0 < n_cols:
            _store_grad(NEG, IDS, LOG_COUNTS, DNEG, rows, row_ok, target, c0, n_cols, temperature, lse, scale,
                        HAS_COUNTS, BLOCK_C)
            c0 += BLOCK_C
    else:
        for c0 in range(0, n_cols, BLOCK_C):
            _store_grad(NEG, IDS, LOG_COUNTS, DNEG, rows, row_ok, target, c0, n_cols, temperature, lse, scale,
                        HAS_COUNTS, BLOCK_C)


def _launch(kernel, n_rows: int, *args, has_counts: bool) -> None:
    kernel[(triton.cdiv(n_rows, _BLOCK_R),)](*args, HAS_COUNTS=has_counts, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
                                            INTERPRET=isinstance(kernel, InterpretedFunction))


class _SampledLse(torch.autograd.Function):
    """``(pos [N], neg [N, M]) -> lse [N]``: the log of each row's softmax denominator, positive included."""

    @staticmethod
    def forward(ctx, pos: Tensor, neg: Tensor, neg_ids: Tensor, targets: Tensor, log_counts: Tensor | None,
                temperature: float):
        n_rows, n_cols = neg.shape
        lse = torch.empty(n_rows, dtype=torch.float32, device=neg.device)
        counts = neg if log_counts is None else log_counts
        _launch(_xent_fwd_kernel, n_rows, pos, neg, neg_ids, targets, counts, lse, n_rows, n_cols, temperature,
                has_counts=log_counts is not None)
        ctx.save_for_backward(pos, neg, neg_ids, targets, log_counts, lse)
        ctx.temperature = temperature
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        pos, neg, neg_ids, targets, log_counts, lse = ctx.saved_tensors
        n_rows, n_cols = neg.shape
        grad = grad.float().contiguous()
        d_neg = torch.empty_like(neg)
        counts = neg if log_counts is None else log_counts
        _launch(_xent_bwd_kernel, n_rows, grad, lse, neg, neg_ids, targets, counts, d_neg, n_rows, n_cols,
                ctx.temperature, has_counts=log_counts is not None)
        d_pos = grad * torch.exp(pos.float() / ctx.temperature - lse) / ctx.temperature
        return d_pos.to(pos.dtype), d_neg, None, None, None, None


def sampled_cross_entropy_triton(pos: Tensor, neg: Tensor, neg_ids: Tensor, targets: Tensor,
                                 log_counts: Tensor | None, temperature: float = 1.0) -> Tensor:
    """``sampled_cross_entropy`` on the Triton kernels."""
    log_counts = None if log_counts is None else log_counts.float().contiguous()
    lse = _SampledLse.apply(pos.contiguous(), neg.contiguous(), neg_ids.contiguous(), targets.contiguous(),
                            log_counts, float(temperature))
    return (lse - pos.float() / temperature).mean()


__all__ = ["sampled_cross_entropy_triton"]
