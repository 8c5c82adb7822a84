"""Triton kernel of the cached (serving / decode) form of KSA: ``ksa_cached_attention`` of ``cached.py``.

Semantics are those of the torch path of ``cached.py`` (the ``KsaRule`` applied by token identity):
every query carries its absolute event index or summary id, every cached key its own, and a
(query, key) pair is visible iff the key lies in the query's interval for its stream; the intervals are
the ones the training kernels walk (``triton_fwd.py``), so both read the rule from one place. The cache may hold keys in
any order (a ring buffer is rotated), so nothing is assumed about positions: each key tile loads the
keys' indices and the rule is evaluated per element (a few integer ops on a ``[BLOCK_Q, BLOCK_N]``
tile, hidden under the loads).

Decode is memory-bound: per new event, the work is one pass over the user's cached K and V. Grid:
one program per ``(user, key split, kv head)``, all users of the batch in one launch, no host sync:

- the user's keys are the event keys then the summary keys (two jagged streams, walked as one loop
  of ``BLOCK_N`` tiles so there is one software pipeline);
- ``NUM_SPLITS`` (flash-decoding): each user's key range is cut into that many equal parts (whole
  tiles). With many users (``users * kv_heads`` fills the GPU) it is 1 and the kernel writes the
  output directly; with few users, each split writes its normalised partial output and log2-sum-exp
  (fp32) and ``ksa_cached_combine_kernel`` merges them;
- the program's tile rows are ``(query row, query head of the kv head)`` pairs (GQA: the group's
  heads share one pass over K/V); a user with more rows than a tile loops over query blocks, each
  block reading the split's K/V once;
- ``tl.dot`` needs 16 tile rows. A streaming step has 1 + S rows a user, so in half precision the padding
  costs nothing (tensor cores), but in float32 (``ieee``: FMAs) a 16-row tile does 8x the multiplies of a
  2-row one. Float32 tiles of few rows (at most ``CachedTritonConfig.fma_rows``) are therefore tiles of exactly
  that many rows (2-8, powers of two) that multiply elementwise and reduce (``BLOCK_Q < 16``), with ``BLOCK_N``
  cut so that the product tile stays within ``_FMA_TILE`` elements a program.

A row that sees no key at all (outside the contract: every token sees itself) gets zeros; the torch
path gives it the value of the user's first cached event key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ksa_rec.ops.ksa.cached import KeyRows, QueryRows
from ksa_rec.ops.ksa.rule import KsaRule
from ksa_rec.ops.ksa.triton_fwd import _qev_kev, _qev_ksum, _qsum_kev, _qsum_ksum
from ksa_rec.ops.ksa.triton_op import UNBOUNDED

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class CachedTritonConfig:
    """Launch parameters. ``block_q`` tile rows (query rows x GQA group; None: from the average rows per
    user, 16..64); ``block_n`` keys per tile; ``num_splits`` key splits per user (None: enough programs
    to fill the GPU, each split at least ``min_split_keys`` keys on average); ``nan_fill`` (tests):
    the output starts as NaN so an unwritten element shows."""

    block_q: int | None = None
    # float32 tiles of at most this many rows use elementwise products instead of tl.dot (module docstring);
    # 0: always tl.dot. 2 = the streaming step without GQA (1 + S rows), the case measured on an H100: 2.4x the
    # 16-row tl.dot tile (docs/results/serving.md); 4-8 rows are correct (tests) but not timed
    fma_rows: int = 2
    # block_n / num_stages: the fastest of pipelines/bench_decode.py --sweep on an H100 (D=64, bf16; 2
    # stages need 168 registers instead of 255 and 40 KB of shared memory: 3 programs per SM)
    block_n: int = 128
    num_splits: int | None = None
    min_split_keys: int = 256
    num_warps: int = 4
    num_stages: int = 2
    nan_fill: bool = False

    def __post_init__(self):
        for name, least in (("block_q", 2), ("block_n", 16)):
            val = getattr(self, name)
            if val is not None and (val < least or val & (val - 1)):
                raise ValueError(f"CachedTritonConfig.{name} must be a power of two >= {least}, got {val}")
        if self.fma_rows < 0:
            raise ValueError(f"CachedTritonConfig.fma_rows must be >= 0, got {self.fma_rows}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"CachedTritonConfig.num_splits must be >= 1, got {self.num_splits}")


@triton.jit
def _visible(i, q_sum, j, in_ev, W, M, CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr):
    """``[BLOCK_Q, BLOCK_N]``: whether key ``j [1, BLOCK_N]`` (event index when ``in_ev``, else summary id)
    lies in the interval that query ``i [BLOCK_Q, 1]`` (summary id where ``q_sum``) sees in that stream."""
    ev_lo, ev_hi = _qev_kev(i, UNIT, W)
    if SUMS > 0:
        sum_lo, sum_hi = _qev_ksum(i, CHUNK, SUMS, W, M)
        qs_ev_lo, qs_ev_hi = _qsum_kev(i, CHUNK, SUMS)
        qs_sum_lo, qs_sum_hi = _qsum_ksum(i, SUMS)
        lo = tl.where(q_sum, tl.where(in_ev, qs_ev_lo, qs_sum_lo), tl.where(in_ev, ev_lo, sum_lo))
        hi = tl.where(q_sum, tl.where(in_ev, qs_ev_hi, qs_sum_hi), tl.where(in_ev, ev_hi, sum_hi))
    else:  # S = 0: no summary keys; a summary query's chunk is its id (KsaRule with max(S, 1))
        lo = tl.where(q_sum, i * CHUNK, ev_lo)
        hi = tl.where(q_sum, i * CHUNK + CHUNK, ev_hi)
    return (j >= lo) & (j < hi)


@triton.jit
def _cached_tile(acc, l_i, m_i, q, i_q, q_sum, k_ptr, v_ptr, idx_ptr, stride_k, stride_v, s, end, in_ev,
                 qk_scale, W, M, CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """One online-softmax step (log2 domain) over cached keys ``s .. s+BLOCK_N`` (< ``end``) of one stream."""
    offs_n = s + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_seg = offs_n < end
    j = tl.load(idx_ptr + offs_n, mask=in_seg, other=0).to(tl.int32)
    if BLOCK_D == HEAD_DIM:  # a row-only mask keeps the loads 16 bytes wide
        k_t = tl.load(k_ptr + offs_n[None, :] * stride_k + offs_d[:, None], mask=in_seg[None, :], other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_v + offs_d[None, :], mask=in_seg[:, None], other=0.0)
    else:
        k_t = tl.load(k_ptr + offs_n[None, :] * stride_k + offs_d[:, None],
                      mask=in_seg[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_v + offs_d[None, :],
                    mask=in_seg[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if BLOCK_Q < 16:  # a float32 tile of few rows (module docstring): [BQ, D, 1] * [1, D, N] summed over D
        qk = tl.sum(q.to(tl.float32)[:, :, None] * k_t.to(tl.float32)[None, :, :], 1) * qk_scale
    else:
        qk = tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale
    vis = _visible(i_q, q_sum, j[None, :], in_ev, W, M, CHUNK, SUMS, UNIT) & in_seg[None, :]
    qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # rows that saw nothing yet keep m = -inf: exponentiate against 0 instead (p = alpha = 0, no NaN)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    if BLOCK_Q < 16:  # [BQ, N, 1] * [1, N, D] summed over N
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), 1)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _cached_qblock(qb, Q, QIDX, QSUM, O, PO, PLSE, k_ev, v_ev, i_ev, k_sm, v_sm, i_sm, q0, nq, hk, split,
                   ev_lo, ev_hi, sm_lo, sm_hi, stride_qt, stride_qh, stride_kt, stride_vt, stride_kst, stride_vst,
                   stride_ot, stride_oh, q_total, qk_scale, W, M, H: tl.constexpr, GROUP: tl.constexpr,
                   CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """Query block qb of one user against the split's event keys ``[ev_lo, ev_hi)`` then summary keys
    ``[sm_lo, sm_hi)`` (user-local rows), one loop; stores the output (or the split's partial)."""
    # tile row r = (query row qb * ROWS + r // GROUP, query head hk * GROUP + r % GROUP)
    ROWS: tl.constexpr = BLOCK_Q // GROUP
    r = tl.arange(0, BLOCK_Q)
    h = hk * GROUP + r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    qrow = qb * ROWS + r // GROUP
    row_ok = (r < ROWS * GROUP) & (qrow < nq)
    t_row = q0 + qrow  # int64 global query row
    q = tl.load(Q + t_row[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    i_q = tl.load(QIDX + t_row, mask=row_ok, other=0).to(tl.int32)[:, None]
    q_sum = tl.load(QSUM + t_row, mask=row_ok, other=0)[:, None] != 0
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    n_ev_tiles = (ev_hi - ev_lo + BLOCK_N - 1) // BLOCK_N
    n_tiles = n_ev_tiles + (sm_hi - sm_lo + BLOCK_N - 1) // BLOCK_N
    # The CPU interpreter stores scalars as 1-element arrays, which NumPy >= 2.4 refuses as range()
    # bounds: it gets a while loop over the same body; the GPU gets a for loop (Triton pipelines it).
    if INTERPRET:
        t = 0
        while t < n_tiles:
            in_ev = t < n_ev_tiles
            acc, l_i, m_i = _cached_tile(
                acc, l_i, m_i, q, i_q, q_sum, tl.where(in_ev, k_ev, k_sm), tl.where(in_ev, v_ev, v_sm),
                tl.where(in_ev, i_ev, i_sm), tl.where(in_ev, stride_kt, stride_kst),
                tl.where(in_ev, stride_vt, stride_vst),
                tl.where(in_ev, ev_lo + t * BLOCK_N, sm_lo + (t - n_ev_tiles) * BLOCK_N),
                tl.where(in_ev, ev_hi, sm_hi), in_ev, qk_scale, W, M, CHUNK, SUMS, UNIT, HEAD_DIM, BLOCK_D,
                BLOCK_Q, BLOCK_N, DOT_PREC)
            t += 1
    else:
        for t in range(0, n_tiles):
            in_ev = t < n_ev_tiles
            acc, l_i, m_i = _cached_tile(
                acc, l_i, m_i, q, i_q, q_sum, tl.where(in_ev, k_ev, k_sm), tl.where(in_ev, v_ev, v_sm),
                tl.where(in_ev, i_ev, i_sm), tl.where(in_ev, stride_kt, stride_kst),
                tl.where(in_ev, stride_vt, stride_vst),
                tl.where(in_ev, ev_lo + t * BLOCK_N, sm_lo + (t - n_ev_tiles) * BLOCK_N),
                tl.where(in_ev, ev_hi, sm_hi), in_ev, qk_scale, W, M, CHUNK, SUMS, UNIT, HEAD_DIM, BLOCK_D,
                BLOCK_Q, BLOCK_N, DOT_PREC)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that saw no key: 0
    if NUM_SPLITS == 1:
        tl.store(O + t_row[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        part = (split * q_total + t_row) * H + h
        tl.store(PO + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PLSE + part, lse, mask=row_ok)


@triton.jit
def ksa_cached_fwd_kernel(
    Q, QIDX, QSUM, K, V, KIDX, KS, VS, SIDX, QOFF, KOFF, KEND, SOFF, SEND, O, PO, PLSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kst, stride_ksh, stride_vst, stride_vsh, stride_ot, stride_oh,
    q_total, qk_scale, W, M,
    H: tl.constexpr, HK: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUMS: tl.constexpr,
    UNIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program = (user b, key split, kv head hk); grid ``B * NUM_SPLITS * HK`` (kv head fastest, so
    the programs reading one user's index tiles run together).

    Q ``[Qt, H, D]``; QIDX int64 ``[Qt]``; QSUM int8 ``[Qt]``; K, V ``[Kt, HK, D]``, KIDX int64 ``[Kt]``;
    KS, VS ``[St, HK, D]``, SIDX int64 ``[St]``; QOFF int64 ``[B+1]``; user b's event keys are rows
    ``[KOFF[b], KEND[b])``, its summary keys ``[SOFF[b], SEND[b])`` (jagged: ``KEND = KOFF[1:]``; fixed buffers:
    each user's rows in use). Output: O ``[Qt, H, D]``
    when NUM_SPLITS == 1, else PO fp32 ``[NUM_SPLITS, Qt, H, BLOCK_D]`` (normalised per split) and
    PLSE fp32 ``[NUM_SPLITS, Qt, H]`` (log2-sum-exp, -inf where the split saw no key).
    """
    pid = tl.program_id(0)
    hk = pid % HK
    split = (pid // HK) % NUM_SPLITS
    b = pid // (HK * NUM_SPLITS)
    q0 = tl.load(QOFF + b)
    nq = (tl.load(QOFF + b + 1) - q0).to(tl.int32)
    k0 = tl.load(KOFF + b)
    nk = (tl.load(KEND + b) - k0).to(tl.int32)
    if SUMS > 0:
        s0 = tl.load(SOFF + b)
        ns = (tl.load(SEND + b) - s0).to(tl.int32)
    else:  # no summary stream: it is never read
        s0 = k0
        ns = nk * 0
    # this split's share of the concatenated [events ; summaries] key range, in whole tiles
    per = ((nk + ns + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = tl.minimum(split * per, nk + ns)
    hi = tl.minimum(lo + per, nk + ns)
    ev_lo, ev_hi = tl.minimum(lo, nk), tl.minimum(hi, nk)
    sm_lo, sm_hi = tl.maximum(lo, nk) - nk, tl.maximum(hi, nk) - nk
    k_ev = K + k0 * stride_kt + hk * stride_kh
    v_ev = V + k0 * stride_vt + hk * stride_vh
    k_sm = KS + s0 * stride_kst + hk * stride_ksh
    v_sm = VS + s0 * stride_vst + hk * stride_vsh
    i_ev = KIDX + k0
    i_sm = SIDX + s0

    if INTERPRET:  # (see _cached_qblock for why the interpreter gets while loops)
        qb = 0
        while qb < (nq + BLOCK_Q // GROUP - 1) // (BLOCK_Q // GROUP):
            _cached_qblock(qb, Q, QIDX, QSUM, O, PO, PLSE, k_ev, v_ev, i_ev, k_sm, v_sm, i_sm, q0, nq, hk, split,
                           ev_lo, ev_hi, sm_lo, sm_hi, stride_qt, stride_qh, stride_kt, stride_vt, stride_kst,
                           stride_vst, stride_ot, stride_oh, q_total, qk_scale, W, M, H, GROUP, CHUNK, SUMS,
                           UNIT, HEAD_DIM, BLOCK_D, BLOCK_Q, BLOCK_N, NUM_SPLITS, DOT_PREC, INTERPRET)
            qb += 1
    else:
        for qb in range(0, (nq + BLOCK_Q // GROUP - 1) // (BLOCK_Q // GROUP)):
            _cached_qblock(qb, Q, QIDX, QSUM, O, PO, PLSE, k_ev, v_ev, i_ev, k_sm, v_sm, i_sm, q0, nq, hk, split,
                           ev_lo, ev_hi, sm_lo, sm_hi, stride_qt, stride_qh, stride_kt, stride_vt, stride_kst,
                           stride_vst, stride_ot, stride_oh, q_total, qk_scale, W, M, H, GROUP, CHUNK, SUMS,
                           UNIT, HEAD_DIM, BLOCK_D, BLOCK_Q, BLOCK_N, NUM_SPLITS, DOT_PREC, INTERPRET)


@triton.jit
def ksa_cached_combine_kernel(PO, PLSE, O, q_total, stride_ot, stride_oh, H: tl.constexpr,
                              NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """Merge the NUM_SPLITS partial softmaxes of one (query row, head); grid ``(Qt, H)``."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P)
    ok = s < NUM_SPLITS
    part = (s * q_total + t) * H + h
    lse = tl.load(PLSE + part, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for splits that saw nothing
    offs_d = tl.arange(0, BLOCK_D)
    o = tl.load(PO + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0, den, 1.0)
    tl.store(O + t * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(ksa_cached_fwd_kernel, InterpretedFunction)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


_FMA_TILE = 8192
"""Elements of the product tile (``[BLOCK_Q, BLOCK_D, BLOCK_N]``) of a float32 tile without tl.dot: 64 a thread
at 4 warps, so it stays in registers."""


def plan_launch(users: int, kv_heads: int, group: int, q_rows: int, keys: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, cfg: CachedTritonConfig) -> tuple[int, int, int]:
    """``(block_q, block_n, num_splits)`` from host-side totals only (no device sync).

    block_q: the average rows per user times the group, as a power of two (at least the group); in float32,
    when that is at most ``cfg.fma_rows`` (and at least 2), a tile of exactly that many rows without tl.dot,
    with ``block_n`` cut so that its product tile holds ``_FMA_TILE`` elements at most; else 16..64 rows.
    num_splits: 1 when ``users * kv_heads`` programs already fill the GPU (4 per multiprocessor); else
    enough splits to reach that, while a split keeps ``min_split_keys`` keys on average (at most 64).
    """
    rows = max(_pow2(group), 2, _pow2(-(-q_rows // max(users, 1)) * group))
    block_n = cfg.block_n
    if cfg.block_q is not None:
        block_q = cfg.block_q
    elif dtype == torch.float32 and rows <= cfg.fma_rows:
        block_q = rows
    else:
        block_q = max(_pow2(group), min(64, max(16, rows)))
    if block_q < 16:
        block_n = max(16, min(block_n, _FMA_TILE // (block_q * max(16, _pow2(head_dim)))))
    if block_q < group:
        raise ValueError(f"a tile of {block_q} rows cannot hold a query's {group} grouped heads")
    if cfg.num_splits is not None:
        return block_q, block_n, cfg.num_splits
    target = 4 * (_sm_count(device.index or 0) if device.type == "cuda" else 4)
    programs = max(users * kv_heads, 1)
    if programs >= target:
        return block_q, block_n, 1
    by_size = max(1, keys // max(users, 1) // cfg.min_split_keys)
    return block_q, block_n, max(1, min(-(-target // programs), by_size, 64))


def ksa_cached_attention_triton(q: Tensor, queries: QueryRows, events: KeyRows, summaries: KeyRows, rule: KsaRule,
                                *, scale: float | None = None, config: CachedTritonConfig | None = None,
                                event_ends: Tensor | None = None, summary_ends: Tensor | None = None) -> Tensor:
    """``ksa_cached_attention`` (cached.py) as one Triton launch (two with key splits), forward only.

    Shapes: q ``[Qt, H, D]`` with ``queries`` (int64 ``index [Qt]``, bool ``is_summary [Qt]``, ``offsets
    [B+1]``); ``events`` / ``summaries``: ``k, v [rows, Hkv, D]``, int64 ``index [rows]``, ``offsets [B+1]``
    (fp16, bf16 or fp32 values, one dtype; the last dim contiguous). Returns ``[Qt, H, D]`` in q's dtype.
    ``event_ends`` / ``summary_ends`` int64 ``[B]`` (default: each stream's ``offsets[1:]``): where user b's keys
    end, when its rows are not followed by the next user's (fixed-capacity buffers: ``ksa_rec.ops.ksa.fixed``,
    where both streams may be views of one buffer).
    D <= 128. Indices must be < 2**31. The layout is not validated (that would need a device sync).
    """
    k, v, k_sum, v_sum = events.k, events.v, summaries.k, summaries.v
    _check(q, k, v, k_sum, v_sum, queries.offsets, events.offsets, summaries.offsets)
    cfg = config or CachedTritonConfig()
    (q_total, H, D), HK = q.shape, k.shape[1]
    scale = D ** -0.5 if scale is None else float(scale)
    if cfg.nan_fill:
        out = torch.full_like(q, float("nan"))
    else:
        out = torch.empty_like(q)
    users = queries.offsets.numel() - 1
    if q_total == 0 or users == 0:
        return out.zero_()
    k, v, k_sum, v_sum = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v, k_sum, v_sum))
    q = q if q.stride(-1) == 1 else q.contiguous()
    # rows that exist, for the split heuristic (both streams one buffer: counted once)
    keys = k.shape[0] + (0 if k_sum.data_ptr() == k.data_ptr() else k_sum.shape[0])
    s_index = summaries.index
    if k_sum.shape[0] == 0:  # empty summary stream: its offsets are all 0, it is never read
        k_sum, v_sum, s_index = k, v, events.index
    k_ends = events.offsets[1:] if event_ends is None else event_ends
    s_ends = summaries.offsets[1:] if summary_ends is None else summary_ends
    group = H // HK
    block_d = max(16, _pow2(D))
    block_q, block_n, splits = plan_launch(users, HK, group, q_total, keys, D, q.dtype, q.device, cfg)
    if splits > 1:
        po = torch.empty((splits, q_total, H, block_d), dtype=torch.float32, device=q.device)
        plse = torch.empty((splits, q_total, H), dtype=torch.float32, device=q.device)
    else:
        po = plse = out  # never dereferenced
    flags = queries.is_summary
    q_sum_flags = (flags.view(torch.int8) if flags.dtype == torch.bool else flags.to(torch.int8)).contiguous()
    ksa_cached_fwd_kernel[(users * splits * HK,)](
        q, queries.index.contiguous(), q_sum_flags, k, v, events.index.contiguous(), k_sum, v_sum,
        s_index.contiguous(), queries.offsets, events.offsets, k_ends, summaries.offsets, s_ends, out, po, plse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_sum.stride(0), k_sum.stride(1), v_sum.stride(0), v_sum.stride(1), out.stride(0), out.stride(1),
        q_total, scale * _LOG2E, UNBOUNDED if rule.window is None else min(rule.window, UNBOUNDED),
        UNBOUNDED if rule.max_summaries is None else min(rule.max_summaries, UNBOUNDED),
        H=H, HK=HK, GROUP=group, CHUNK=rule.chunk_size, SUMS=rule.summary_tokens, UNIT=rule.unit, HEAD_DIM=D,
        BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_N=block_n, NUM_SPLITS=splits,
        # float32: FMAs. Three TF32 products ("tf32x3") were slower in the fixed step (docs/results/serving.md)
        DOT_PREC="ieee" if q.dtype == torch.float32 else None, INTERPRET=_interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        ksa_cached_combine_kernel[(q_total, H)](po, plse, out, q_total, out.stride(0), out.stride(1), H=H,
                                                NUM_SPLITS=splits, SPLITS_P=max(2, _pow2(splits)), HEAD_DIM=D,
                                                BLOCK_D=block_d, num_warps=1)
    return out


def _check(q, k, v, k_sum, v_sum, q_offsets, k_offsets, s_offsets) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("k_sum", k_sum), ("v_sum", v_sum)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [rows, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"ksa_cached_attention_triton supports {_DTYPES}, got {q.dtype}")
    H, D, HK = q.shape[1], q.shape[2], k.shape[1]
    if v.shape != k.shape or k.shape[2] != D or k_sum.shape[1:] != k.shape[1:] or v_sum.shape != k_sum.shape:
        raise ValueError(f"k, v, k_sum, v_sum must be [rows, Hkv, {D}], got {tuple(k.shape)}, {tuple(v.shape)}, "
                         f"{tuple(k_sum.shape)}, {tuple(v_sum.shape)}")
    if H % HK:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HK})")
    if D > 128:
        raise ValueError(f"ksa_cached_attention_triton supports head dims up to 128, got {D}")
    if not q_offsets.numel() == k_offsets.numel() == s_offsets.numel():
        raise ValueError("query, event-key and summary-key offsets must all be [B+1]")
    if not _interpreting() and not q.is_cuda:
        raise RuntimeError("ksa_cached_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "ksa_rec.ops.ksa.triton_cached is first imported, to run the kernel on CPU)")


__all__ = ["CachedTritonConfig", "ksa_cached_attention_triton", "plan_launch"]
