"""Triton backward kernels of KSA (see TRITON.md). Index math is shared with ``triton_fwd.py``.

Three launches, each element of every gradient written by exactly one program (no atomics), so the
backward is bitwise deterministic:

1. ``ksa_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` per (row, head), fp32, one stream a launch.
2. ``ksa_bwd_dkdv_kernel``: one program per (key block, kv head) of either stream; it walks the event
   queries that see its keys in matmul tiles (a band for event keys, a run of later chunks for summary
   keys), then adds the few summary queries that see them (the S slots of the key's chunk) row by row,
   and accumulates dK, dV in registers. With GQA it also walks the GROUP query heads of its kv head, so
   dK/dV still need no atomics.
3. ``ksa_bwd_dq_kernel``: one program per (event query block, head), the forward's key walk in matmul
   tiles, then the summary queries of the chunks that end in the block, row by row.

``ATOMIC_DQ`` (opt-in, non-deterministic): the dkdv programs also add ``dS @ K`` into an fp32 dQ buffer
of the event queries with atomics, and launch 3 computes only the summary queries' dQ. It saves the
recomputation of QK^T and dO V^T (7 -> 5 matmuls per visible tile) at the price of run-to-run bit
differences.

Pointers: dK/dV/dQ outputs and dO are contiguous ``[rows, heads, D]``; LSE and delta are ``[H, rows]``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ksa_rec.ops.ksa.triton_fwd import (
    _block_summary_rows,
    _event_query_keys,
    _kev_qev,
    _kev_qsum,
    _ksum_qev,
    _ksum_qsum,
    _ntiles,
    _qsum_kev,
    _qsum_ksum,
    _split,
    _sum_row_step,
    _walk_step,
)


@triton.jit
def ksa_bwd_preprocess_kernel(O, DO, DELTA, T, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """``DELTA[h, t] = sum_d O[t, h, d] * DO[t, h, d]`` (both contiguous ``[T, H, D]``); grid (cdiv(T, BLOCK), H)."""
    h = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs < T
    ptrs = offs.to(tl.int64)[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + h * T + offs, tl.sum(o * do, 1), mask=ok)


# ---- dK / dV: key rows fixed, walk the query tiles that see them -----------------------------------

@triton.jit
def _dkdv_tile(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, stride_q, stride_do, s, end, masked,
               row_lo, row_hi, qk_scale, sm_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
    """Add the contribution of query rows ``s .. s+BLOCK_M`` of one stream to dK, dV of the program's keys.

    Works transposed (keys x queries) so that P^T and dS^T come out of the MMA in the layout the next
    MMA needs. dO and the fp32 dQ accumulator rows are ``stride_do`` apart.
    """
    offs_m = s + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seg = offs_m < end
    q_t = tl.load(q_ptr + offs_m[None, :] * stride_q + offs_d[:, None], mask=in_seg[None, :], other=0.0)
    lse = tl.load(lse_ptr + offs_m, mask=in_seg, other=0.0)
    p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PREC) * qk_scale - lse[None, :])
    if masked:
        vis = (offs_m[None, :] >= row_lo[:, None]) & (offs_m[None, :] < row_hi[:, None])
        p_t = tl.where(vis, p_t, 0.0)
    do = tl.load(do_ptr + offs_m[:, None] * stride_do + offs_d[None, :], mask=in_seg[:, None], other=0.0)
    delta = tl.load(delta_ptr + offs_m, mask=in_seg, other=0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
    dk = tl.dot(ds_t, tl.trans(q_t), dk, input_precision=DOT_PREC)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PREC) * sm_scale
        tl.atomic_add(dq_ptr + offs_m[:, None] * stride_do + offs_d[None, :], dq, mask=in_seg[:, None],
                      sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_walk(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, stride_q, lo, hi, flo, fhi, row_lo, row_hi,
               stride_do, qk_scale, sm_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """Event query rows ``[lo, hi)`` in tiles of BLOCK_M; ``[flo, fhi)``: rows that see every key of the
    program (tiles inside it skip the mask). See ``triton_fwd._fwd_walk`` for the interpreter's while loop."""
    a0, a1 = _split(lo, hi, flo, fhi, BLOCK_M)
    n_tiles = _ntiles(lo, hi, BLOCK_M)
    if INTERPRET:
        t = 0
        while t < n_tiles:
            s = lo + t * BLOCK_M
            dk, dv = _dkdv_tile(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, stride_q, stride_do, s, hi,
                                (s < a0) | (s >= a1), row_lo, row_hi, qk_scale, sm_scale, BLOCK_M, HEAD_DIM,
                                ATOMIC_DQ, DOT_PREC)
            t += 1
    else:
        for t in range(0, n_tiles):
            s = lo + t * BLOCK_M
            dk, dv = _dkdv_tile(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, stride_q, stride_do, s, hi,
                                (s < a0) | (s >= a1), row_lo, row_hi, qk_scale, sm_scale, BLOCK_M, HEAD_DIM,
                                ATOMIC_DQ, DOT_PREC)
    return dk, dv


@triton.jit
def ksa_bwd_dkdv_kernel(
    Q, K, V, QS, KS, VS, DO, DOS, LSE, LSES, DELTA, DELTAS, DK, DV, DKS, DVS, DQA, EVK_TABLE, SUMK_TABLE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qst, stride_qsh, stride_kst, stride_ksh, stride_vst, stride_vsh,
    T, TS, n_sum_programs, qk_scale, sm_scale, W, M,
    HK: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SUM: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program = one (block of BLOCK_N key rows, kv head). Programs ``[0, n_sum_programs)`` own
    summary keys (SUMK_TABLE, most-seen first: they are the long ones), the rest event keys.

    Every program walks the event queries that see its keys in matmul tiles, then adds the summary
    queries that do (the S slots of a key's chunk) row by row, over the GROUP query heads of its kv
    head. dK, dV ``[rows, HK, D]`` contiguous, written once; DQA: fp32 ``[T, H, D]`` accumulator of the
    event queries' dQ, touched only when ATOMIC_DQ (summary queries' dQ comes from ``ksa_bwd_dq_kernel``).
    """
    H: tl.constexpr = HK * GROUP
    pid = tl.program_id(0)
    is_sum = pid < n_sum_programs
    pid = tl.where(is_sum, pid, pid - n_sum_programs)
    blk = pid // HK
    hk = pid % HK
    table = tl.where(is_sum, SUMK_TABLE, EVK_TABLE) + blk * 4
    e0 = tl.load(table).to(tl.int64)
    n = tl.load(table + 1)
    s0 = tl.load(table + 2).to(tl.int64)
    r0 = tl.load(table + 3)
    if r0 >= 0:
        n_sum = n // CHUNK * SUMS
        n_rows = tl.where(is_sum, n_sum, n)
        offs = r0 + tl.arange(0, BLOCK_N)
        row_ok = offs < n_rows
        last = tl.minimum(r0 + BLOCK_N, n_rows) - 1
        offs_d = tl.arange(0, HEAD_DIM)
        k_ptr = tl.where(is_sum, KS + s0 * stride_kst + hk * stride_ksh, K + e0 * stride_kt + hk * stride_kh)
        v_ptr = tl.where(is_sum, VS + s0 * stride_vst + hk * stride_vsh, V + e0 * stride_vt + hk * stride_vh)
        stride_k = tl.where(is_sum, stride_kst, stride_kt)
        stride_v = tl.where(is_sum, stride_vst, stride_vt)
        k = tl.load(k_ptr + offs[:, None] * stride_k + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        v = tl.load(v_ptr + offs[:, None] * stride_v + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # event queries. Event keys: a band (diagonal and far edge masked); summary keys: the events of
        # chunks W+1 .. W+M after theirs, one dense run (masked at its two ends).
        if is_sum:
            # (SUMS == 0: no summary programs exist; the guard keeps x // SUMS out of the compiled code)
            if HAS_SUM and SUMS > 0:
                row_lo, row_hi = _ksum_qev(offs, n, CHUNK, SUMS, W, M)
                lo, fhi = _ksum_qev(r0, n, CHUNK, SUMS, W, M)
                flo, hi = _ksum_qev(last, n, CHUNK, SUMS, W, M)
            else:
                row_lo, row_hi = offs, offs
                lo, hi, flo, fhi = r0, r0, r0, r0
        else:
            row_lo, row_hi = _kev_qev(offs, n, UNIT, W)
            lo, fhi = _kev_qev(r0, n, UNIT, W)
            flo, hi = _kev_qev(last, n, UNIT, W)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        # summary queries: an event key of a complete chunk c is seen by the S slots of c; summary key
        # (c, j') by the slots j >= j' of its own chunk. Both are a run of at most S summary rows.
        if SUMS > 0:
            ev_lo, ev_hi = _kev_qsum(offs, n, CHUNK, SUMS)
            sum_lo, sum_hi = _ksum_qsum(offs, SUMS)
            q_lo = tl.where(is_sum, sum_lo, ev_lo)
            q_hi = tl.where(is_sum, sum_hi, ev_hi)
            for g in range(GROUP):
                h = hk * GROUP + g
                for j in range(SUMS):
                    dk, dv = _dkdv_from_summary_queries(
                        dk, dv, k, v, q_lo + j, row_ok & (q_lo + j < q_hi),
                        QS + s0 * stride_qst + h * stride_qsh, DOS + (s0 * H + h) * HEAD_DIM, LSES + h * TS + s0,
                        DELTAS + h * TS + s0, stride_qst, H * HEAD_DIM, qk_scale, HEAD_DIM)
        for g in range(GROUP):
            h = hk * GROUP + g
            dk, dv = _dkdv_walk(
                dk, dv, k, v, Q + e0 * stride_qt + h * stride_qh, DO + (e0 * H + h) * HEAD_DIM, LSE + h * T + e0,
                DELTA + h * T + e0, DQA + (e0 * H + h) * HEAD_DIM, stride_qt, lo, hi, flo, fhi, row_lo, row_hi,
                H * HEAD_DIM, qk_scale, sm_scale, BLOCK_M, HEAD_DIM, ATOMIC_DQ, DOT_PREC, INTERPRET)
        out = tl.where(is_sum, s0, e0) + offs[:, None]
        ptrs = out * (HK * HEAD_DIM) + hk * HEAD_DIM + offs_d[None, :]
        tl.store(tl.where(is_sum, DKS, DK) + ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=row_ok[:, None])
        tl.store(tl.where(is_sum, DVS, DV) + ptrs, dv.to(DV.dtype.element_ty), mask=row_ok[:, None])


# ---- dQ: query rows fixed, walk the same key tiles as the forward ------------------------------------

@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k, stride_v, s, end, masked, row_lo, row_hi, qk_scale,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = s + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seg = offs_n < end
    k_t = tl.load(k_ptr + offs_n[None, :] * stride_k + offs_d[:, None], mask=in_seg[None, :], other=0.0)
    v_t = tl.load(v_ptr + offs_n[None, :] * stride_v + offs_d[:, None], mask=in_seg[None, :], other=0.0)
    p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale - lse[:, None])
    if masked:
        vis = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PREC)
    ds = (p * (dp - delta[:, None])).to(k_t.dtype)
    return tl.dot(ds, tl.trans(k_t), dq, input_precision=DOT_PREC)


@triton.jit
def _dq_walk(q, do, lse, delta, ka, va, stride_ka, stride_va, lo_a, hi_a, flo_a, fhi_a, row_lo_a, row_hi_a,
             kb, vb, stride_kb, stride_vb, lo_b, hi_b, flo_b, fhi_b, row_lo_b, row_hi_b, qk_scale,
             ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
             INTERPRET: tl.constexpr):
    """dQ (unscaled, fp32) over the key tiles of ``triton_fwd._fwd_walk``, one loop."""
    dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    a0, a1 = _split(lo_a, hi_a, flo_a, fhi_a, BLOCK_N)
    b0, b1 = _split(lo_b, hi_b, flo_b, fhi_b, BLOCK_N)
    na = _ntiles(lo_a, hi_a, BLOCK_N)
    n_tiles = na + _ntiles(lo_b, hi_b, BLOCK_N)
    if INTERPRET:
        t = 0
        while t < n_tiles:
            in_a, s, end, masked = _walk_step(t, na, lo_a, lo_b, a0, a1, b0, b1, hi_a, hi_b, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse, delta, tl.where(in_a, ka, kb), tl.where(in_a, va, vb),
                          tl.where(in_a, stride_ka, stride_kb), tl.where(in_a, stride_va, stride_vb), s, end, masked,
                          tl.where(in_a, row_lo_a, row_lo_b), tl.where(in_a, row_hi_a, row_hi_b), qk_scale,
                          BLOCK_N, HEAD_DIM, DOT_PREC)
            t += 1
    else:
        for t in range(0, n_tiles):
            in_a, s, end, masked = _walk_step(t, na, lo_a, lo_b, a0, a1, b0, b1, hi_a, hi_b, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse, delta, tl.where(in_a, ka, kb), tl.where(in_a, va, vb),
                          tl.where(in_a, stride_ka, stride_kb), tl.where(in_a, stride_va, stride_vb), s, end, masked,
                          tl.where(in_a, row_lo_a, row_lo_b), tl.where(in_a, row_hi_a, row_hi_b), qk_scale,
                          BLOCK_N, HEAD_DIM, DOT_PREC)
    return dq


@triton.jit
def _dq_rows(Q, DO, LSE, DELTA, DQ, e0, h, stride_qt, rows_total, offs, row_ok, H: tl.constexpr,
             HEAD_DIM: tl.constexpr):
    """Load q, dO, lse, delta of a block of query rows; returns them and the dQ store pointers."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + e0 * stride_qt + offs[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    rows = (e0 + offs[:, None]) * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    do = tl.load(DO + rows, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + h * rows_total + e0 + offs, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + h * rows_total + e0 + offs, mask=row_ok, other=0.0)
    return q, do, lse, delta, DQ + rows


@triton.jit
def ksa_bwd_dq_kernel(
    Q, K, V, QS, KS, VS, DO, DOS, LSE, LSES, DELTA, DELTAS, DQ, DQS, EV_TABLE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qst, stride_qsh, stride_kst, stride_ksh, stride_vst, stride_vsh,
    T, TS, qk_scale, sm_scale, W, M,
    H: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUM_ROWS: tl.constexpr, HAS_SUM: tl.constexpr,
    EVENT_DQ: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program layout of ``ksa_fwd_kernel``: one (event query block, head) of EV_TABLE, then the summary
    queries of the chunks that end in the block. ``EVENT_DQ`` False (atomic dQ: the event rows' dQ came
    from the dK/dV kernel): the summary queries only. dO and dQ are contiguous ``[rows, H, D]``."""
    pid = tl.program_id(0)
    blk = pid // H
    h = pid % H
    hk = h // GROUP
    table = EV_TABLE + blk * 4
    e0 = tl.load(table).to(tl.int64)
    n = tl.load(table + 1)
    s0 = tl.load(table + 2).to(tl.int64)
    r0 = tl.load(table + 3)
    k_ev = K + e0 * stride_kt + hk * stride_kh
    v_ev = V + e0 * stride_vt + hk * stride_vh
    k_sum = KS + s0 * stride_kst + hk * stride_ksh
    v_sum = VS + s0 * stride_vst + hk * stride_vsh
    if r0 >= 0:
        last = tl.minimum(r0 + BLOCK_M, n) - 1
        if EVENT_DQ:
            offs = r0 + tl.arange(0, BLOCK_M)
            row_ok = offs < n
            q, do, lse, delta, dq_ptrs = _dq_rows(Q + h * stride_qh, DO, LSE, DELTA, DQ, e0, h, stride_qt, T, offs,
                                                  row_ok, H, HEAD_DIM)
            (lo_a, hi_a, flo_a, fhi_a, row_lo_a, row_hi_a,
             lo_b, hi_b, flo_b, fhi_b, row_lo_b, row_hi_b) = _event_query_keys(offs, r0, last, W, M, CHUNK, SUMS,
                                                                               UNIT, HAS_SUM)
            dq = _dq_walk(q, do, lse, delta, k_ev, v_ev, stride_kt, stride_vt, lo_a, hi_a, flo_a, fhi_a, row_lo_a,
                          row_hi_a, k_sum, v_sum, stride_kst, stride_vst, lo_b, hi_b, flo_b, fhi_b, row_lo_b,
                          row_hi_b, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_PREC, INTERPRET)
            tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
        # (see ksa_fwd_kernel: after the event rows, no x // SUMS compiled when S == 0, blocks where no chunk ends)
        if SUMS > 0:
            if (last + 1) // CHUNK > r0 // CHUNK:
                offs_s, ok_s = _block_summary_rows(r0, last, CHUNK, SUMS, SUM_ROWS)
                # (names of their own: a runtime branch may not retype the event rows' tensors)
                q_s, do_s, lse_s, delta_s, dqs_ptrs = _dq_rows(QS + h * stride_qsh, DOS, LSES, DELTAS, DQS, s0, h,
                                                               stride_qst, TS, offs_s, ok_s, H, HEAD_DIM)
                dq_s = _sum_rows_dq(q_s.to(tl.float32), do_s.to(tl.float32), lse_s, delta_s, k_ev, v_ev, stride_kt,
                                    stride_vt, k_sum, v_sum, stride_kst, stride_vst, offs_s, ok_s, qk_scale, SUM_ROWS,
                                    CHUNK, SUMS, HEAD_DIM)
                tl.store(dqs_ptrs, (dq_s * sm_scale).to(DQS.dtype.element_ty), mask=ok_s[:, None])


@triton.jit
def _sum_rows_dq(q, do, lse, delta, k_ev, v_ev, stride_k, stride_v, k_sum, v_sum, stride_ks, stride_vs, offs, row_ok,
                 qk_scale, ROWS: tl.constexpr, CHUNK: tl.constexpr, SUMS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """dQ (unscaled, fp32) of summary query rows ``offs``: the keys of ``triton_fwd._sum_rows_fwd``, one a step
    (q, dO ``[ROWS, D]`` fp32)."""
    ev_lo, _ = _qsum_kev(offs, CHUNK, SUMS)
    sum_lo, sum_hi = _qsum_ksum(offs, SUMS)
    dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for step in range(CHUNK + SUMS):
        k, v, vis = _sum_row_step(step, ev_lo, sum_lo, sum_hi, row_ok, k_ev, v_ev, stride_k, stride_v, k_sum, v_sum,
                                  stride_ks, stride_vs, CHUNK, HEAD_DIM)
        p = tl.where(vis, tl.math.exp2(tl.sum(q * k, 1) * qk_scale - lse), 0.0)
        ds = p * (tl.sum(do * v, 1) - delta)
        dq += ds[:, None] * k
    return dq


@triton.jit
def _dkdv_from_summary_queries(dk, dv, k, v, q_rows, vis, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q, stride_do,
                               qk_scale, HEAD_DIM: tl.constexpr):
    """Add one summary query per key row (``q_rows [BLOCK_N]``, where ``vis``) to dK, dV (``[BLOCK_N, D]``
    fp32): the few summary queries that see a key (its chunk's S slots) are gathered row by row instead
    of walked in matmul tiles (see ``triton_fwd._sum_rows_fwd``). The kernel calls it before its matmul walk:
    after the walk it raised the kernel's registers from 167 to 240 (ptxas, sm_90a)."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q + offs_d[None, :], mask=vis[:, None], other=0.0)
    do = tl.load(do_ptr + q_rows[:, None] * stride_do + offs_d[None, :], mask=vis[:, None], other=0.0)
    lse = tl.load(lse_ptr + q_rows, mask=vis, other=0.0)
    delta = tl.load(delta_ptr + q_rows, mask=vis, other=0.0)
    p = tl.where(vis, tl.math.exp2(tl.sum(k.to(tl.float32) * q.to(tl.float32), 1) * qk_scale - lse), 0.0)
    ds = p * (tl.sum(v.to(tl.float32) * do.to(tl.float32), 1) - delta)
    return dk + ds[:, None] * q.to(tl.float32), dv + p[:, None] * do.to(tl.float32)
