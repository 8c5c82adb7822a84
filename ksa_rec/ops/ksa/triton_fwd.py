"""Triton forward kernel of KSA over the two-stream jagged layout, plus the index math shared with
the backward kernels (``triton_bwd.py``). Launcher and autograd: ``triton_op.py``; design: TRITON.md.

Every visibility rule of KSA.md section 3 (with ``max_summaries`` M) is, for one query row, a
contiguous *interval* of key rows of one stream, and both ends of the interval are non-decreasing in
the row index. Transposed (which queries see a key) the same holds. The ``_q*``/``_k*`` helpers below
return those intervals ``[lo, hi)`` in user-local indices; they take scalars or ``[BLOCK]`` vectors.
A program that owns rows ``first..last`` of one user therefore visits the key interval
``[lo(first), hi(last))``; keys in ``[lo(last), hi(first))`` are visible to every row (no mask), the
two ends need an element mask (``_split``).

Conventions: ``CHUNK`` = k, ``SUMS`` = S, ``UNIT`` = u (the window's step, ``KsaRule.unit``) (constexpr);
``W`` = window, ``M`` = max_summaries as ints,
``None`` passed as a large value (``triton_op.UNBOUNDED``); chunk numbers are clamped before they are
multiplied by k, so nothing overflows int32. Events of a user: ``n``, complete chunks ``C = n // k``,
summaries ``NS = S * C``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Masked scores are set to this (not -inf): a row whose first tiles are all masked then keeps a finite
# running max, and its garbage is wiped (alpha = exp2(-1e6 - m) = 0) by the first visible key. Every
# valid row sees at least one key (an event itself, a summary its own chunk), so the garbage never
# survives. -inf would give exp2(-inf - -inf) = NaN instead.
MASKED_SCORE = tl.constexpr(-1.0e6)


# ---- visibility intervals: query side (keys seen by a query row) -------------------------------------

@triton.jit
def _qev_kev(i, UNIT: tl.constexpr, W):
    """Event keys seen by event query i: its window step causally and the W steps of UNIT events before
    (UNIT = k: whole chunks; UNIT = 1: a token window)."""
    return tl.maximum(i // UNIT - W, 0) * UNIT, i + 1


@triton.jit
def _qev_ksum(i, CHUNK: tl.constexpr, SUMS: tl.constexpr, W, M):
    """Summary keys seen by event query i: chunks c with c(i) - W - M <= c < c(i) - W."""
    c = i // CHUNK
    return tl.maximum(c - W - M, 0) * SUMS, tl.maximum(c - W, 0) * SUMS


@triton.jit
def _qsum_kev(r, CHUNK: tl.constexpr, SUMS: tl.constexpr):
    """Event keys seen by summary query r: the k events of its chunk."""
    c = r // SUMS
    return c * CHUNK, c * CHUNK + CHUNK


@triton.jit
def _qsum_ksum(r, SUMS: tl.constexpr):
    """Summary keys seen by summary query r = (c, j): slots j' <= j of its own chunk."""
    return r // SUMS * SUMS, r + 1


# ---- visibility intervals: key side (queries that see a key row) ------------------------------------

@triton.jit
def _kev_qev(j, n, UNIT: tl.constexpr, W):
    """Event queries that see event key j: i >= j with i // UNIT <= j // UNIT + W."""
    last_step = tl.minimum(j // UNIT + W, n // UNIT)
    return j, tl.minimum((last_step + 1) * UNIT, n)


@triton.jit
def _kev_qsum(j, n, CHUNK: tl.constexpr, SUMS: tl.constexpr):
    """Summary queries that see event key j: those of its chunk (none for a trailing partial chunk)."""
    n_chunks = n // CHUNK
    c = j // CHUNK
    return tl.minimum(c, n_chunks) * SUMS, tl.minimum(c + 1, n_chunks) * SUMS


@triton.jit
def _ksum_qev(r, n, CHUNK: tl.constexpr, SUMS: tl.constexpr, W, M):
    """Event queries that see summary key r of chunk c: c + W < c(i) <= c + W + M."""
    n_chunks = n // CHUNK
    c = r // SUMS
    lo = (tl.minimum(c + W, n_chunks) + 1) * CHUNK
    hi = (tl.minimum(c + W + M, n_chunks) + 1) * CHUNK
    return tl.minimum(lo, n), tl.minimum(hi, n)


@triton.jit
def _ksum_qsum(r, SUMS: tl.constexpr):
    """Summary queries that see summary key r = (c, j'): slots j >= j' of the same chunk."""
    return r, (r // SUMS + 1) * SUMS


@triton.jit
def _split(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Cut ``[lo, hi)`` into masked ``[lo, a)``, unmasked ``[a, b)``, masked ``[b, hi)``.

    Tiles start at ``lo + t * BLOCK``; ``[a, b)`` is the largest run of whole tiles inside the
    all-rows-visible range ``[full_lo, full_hi)``.
    """
    a = lo + (tl.maximum(full_lo - lo, 0) + BLOCK - 1) // BLOCK * BLOCK
    b = lo + tl.maximum(full_hi - lo, 0) // BLOCK * BLOCK
    a = tl.minimum(a, hi)
    b = tl.minimum(tl.maximum(b, a), hi)
    return a, b


@triton.jit
def _ntiles(lo, hi, BLOCK: tl.constexpr):
    return (tl.maximum(hi - lo, 0) + BLOCK - 1) // BLOCK


@triton.jit
def _walk_step(t, na, lo_a, lo_b, a0, a1, b0, b1, hi_a, hi_b, BLOCK: tl.constexpr):
    """Tile t of a walk over stream a's tiles then stream b's: (in_a, first row, end, needs mask).

    ``[a0, a1)`` / ``[b0, b1)``: the unmasked runs of each stream (``_split``).
    """
    in_a = t < na
    s = tl.where(in_a, lo_a + t * BLOCK, lo_b + (t - na) * BLOCK)
    end = tl.where(in_a, hi_a, hi_b)
    masked = tl.where(in_a, (s < a0) | (s >= a1), (s < b0) | (s >= b1))
    return in_a, s, end, masked


# ---- forward ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k, stride_v, s, end, masked, row_lo, row_hi, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over key rows ``s .. s+BLOCK_N`` (user-local) of one stream.

    ``masked`` is uniform over the program: interior tiles skip the element mask (the loads stay
    predicated on ``end``, which costs next to nothing).
    """
    offs_n = s + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seg = offs_n < end
    k_t = tl.load(k_ptr + offs_n[None, :] * stride_k + offs_d[:, None], mask=in_seg[None, :], other=0.0)
    qk = tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale
    if masked:
        vis = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
        qk = tl.where(vis, qk, MASKED_SCORE)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + offs_n[:, None] * stride_v + offs_d[None, :], mask=in_seg[:, None], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_walk(q, ka, va, stride_ka, stride_va, lo_a, hi_a, flo_a, fhi_a, row_lo_a, row_hi_a,
              kb, vb, stride_kb, stride_vb, lo_b, hi_b, flo_b, fhi_b, row_lo_b, row_hi_b, qk_scale,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
              INTERPRET: tl.constexpr):
    """Single-pass online softmax of ROWS queries over key rows ``[lo_a, hi_a)`` of stream a and
    ``[lo_b, hi_b)`` of stream b, as one loop (one software pipeline, no per-segment prologue).

    ``[flo, fhi)`` per stream: keys every row sees (tiles inside it skip the mask); ``row_lo/row_hi``
    ``[ROWS]``: each row's own interval. Returns ``(acc, l, m)`` (fp32, log2 domain).
    """
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    a0, a1 = _split(lo_a, hi_a, flo_a, fhi_a, BLOCK_N)
    b0, b1 = _split(lo_b, hi_b, flo_b, fhi_b, BLOCK_N)
    na = _ntiles(lo_a, hi_a, BLOCK_N)
    n_tiles = na + _ntiles(lo_b, hi_b, BLOCK_N)
    # The CPU interpreter stores scalars as 1-element arrays, which NumPy >= 2.4 refuses as range()
    # bounds: it gets a while loop over the same body; the GPU gets a for loop (Triton pipelines it).
    if INTERPRET:
        t = 0
        while t < n_tiles:
            in_a, s, end, masked = _walk_step(t, na, lo_a, lo_b, a0, a1, b0, b1, hi_a, hi_b, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, tl.where(in_a, ka, kb), tl.where(in_a, va, vb),
                                      tl.where(in_a, stride_ka, stride_kb), tl.where(in_a, stride_va, stride_vb),
                                      s, end, masked, tl.where(in_a, row_lo_a, row_lo_b),
                                      tl.where(in_a, row_hi_a, row_hi_b), qk_scale, BLOCK_N, HEAD_DIM, DOT_PREC)
            t += 1
    else:
        for t in range(0, n_tiles):
            in_a, s, end, masked = _walk_step(t, na, lo_a, lo_b, a0, a1, b0, b1, hi_a, hi_b, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, tl.where(in_a, ka, kb), tl.where(in_a, va, vb),
                                      tl.where(in_a, stride_ka, stride_kb), tl.where(in_a, stride_va, stride_vb),
                                      s, end, masked, tl.where(in_a, row_lo_a, row_lo_b),
                                      tl.where(in_a, row_hi_a, row_hi_b), qk_scale, BLOCK_N, HEAD_DIM, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_store(acc, l_i, m_i, o_ptr, stride_o, lse_ptr, offs, row_ok, HEAD_DIM: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    out = acc / l_i[:, None]
    tl.store(o_ptr + offs[:, None] * stride_o + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + offs, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _event_query_keys(offs, r0, last, W, M, CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr,
                      HAS_SUM: tl.constexpr):
    """The key walk of event query rows ``offs`` (rows ``r0 .. last`` of one user), per stream (a: events,
    b: summaries): ``lo, hi`` (keys visited), ``flo, fhi`` (keys every row sees) and each row's ``row_lo, row_hi``.

    Events: ``[first row's window start, last row]``: window edge (masked), interior, diagonal (masked).
    Summaries: one dense run ``[lo(first), hi(last))`` per user, masked only at its two ends (none without HAS_SUM).
    """
    row_lo_a, row_hi_a = _qev_kev(offs, UNIT, W)
    lo_a, fhi_a = _qev_kev(r0, UNIT, W)
    flo_a, hi_a = _qev_kev(last, UNIT, W)
    if HAS_SUM:
        row_lo_b, row_hi_b = _qev_ksum(offs, CHUNK, SUMS, W, M)
        lo_b, fhi_b = _qev_ksum(r0, CHUNK, SUMS, W, M)
        flo_b, hi_b = _qev_ksum(last, CHUNK, SUMS, W, M)
    else:
        row_lo_b, row_hi_b = row_lo_a, row_hi_a
        lo_b, hi_b, flo_b, fhi_b = 0, 0, 0, 0
    return lo_a, hi_a, flo_a, fhi_a, row_lo_a, row_hi_a, lo_b, hi_b, flo_b, fhi_b, row_lo_b, row_hi_b


@triton.jit
def _block_summary_rows(r0, last, CHUNK: tl.constexpr, SUMS: tl.constexpr, SUM_ROWS: tl.constexpr):
    """Summary rows (user-local ``[SUM_ROWS]``, and which exist) of the chunks whose last event lies in
    the event rows ``r0 .. last``: the event program that holds a chunk's end also computes its summary
    queries, whose keys (the chunk's events) it has just loaded. At most ``cdiv(BLOCK_M, k)`` chunks end
    in a block, so ``SUM_ROWS = next_pow2(cdiv(BLOCK_M, k) * S)`` (``sum_rows_per_block``) covers them."""
    rows = r0 // CHUNK * SUMS + tl.arange(0, SUM_ROWS)
    return rows, rows < (last + 1) // CHUNK * SUMS


@triton.jit
def ksa_fwd_kernel(
    Q, K, V, QS, KS, VS, O, OS, LSE, LSES, EV_TABLE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_qst, stride_qsh, stride_kst, stride_ksh, stride_vst, stride_vsh, stride_ost, stride_osh,
    T, TS, qk_scale, W, M,
    H: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUM_ROWS: tl.constexpr,
    HAS_SUM: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program = one (block of BLOCK_M event queries, head), EV_TABLE heaviest first; it then
    computes the summary queries of the chunks that end in its block (``_block_summary_rows``).

    Table: int32 ``[G, 4]`` rows ``(event offset, n, summary offset, first row)``; first row < 0
    marks padding (the grid is an upper bound so that building it needs no host sync).
    LSE ``[H, T]``, LSES ``[H, TS]``: fp32 log2-sum-exp of the scaled scores, saved for backward.
    """
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
    offs_d = tl.arange(0, HEAD_DIM)
    if r0 >= 0:
        offs = r0 + tl.arange(0, BLOCK_M)
        row_ok = offs < n
        last = tl.minimum(r0 + BLOCK_M, n) - 1
        q = tl.load(Q + e0 * stride_qt + h * stride_qh + offs[:, None] * stride_qt + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        (lo_a, hi_a, flo_a, fhi_a, row_lo_a, row_hi_a,
         lo_b, hi_b, flo_b, fhi_b, row_lo_b, row_hi_b) = _event_query_keys(offs, r0, last, W, M, CHUNK, SUMS, UNIT,
                                                                           HAS_SUM)
        acc, l_i, m_i = _fwd_walk(q, k_ev, v_ev, stride_kt, stride_vt, lo_a, hi_a, flo_a, fhi_a, row_lo_a, row_hi_a,
                                  k_sum, v_sum, stride_kst, stride_vst, lo_b, hi_b, flo_b, fhi_b, row_lo_b,
                                  row_hi_b, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_PREC, INTERPRET)
        _fwd_store(acc, l_i, m_i, O + e0 * stride_ot + h * stride_oh, stride_ot, LSE + h * T + e0, offs, row_ok,
                   HEAD_DIM)
        # after the event rows are stored, so that the walk's register peak stays its own; S == 0: the
        # constexpr test keeps x // SUMS out of the compiled code; a block in which no chunk ends (k > BLOCK_M,
        # a user's last rows) skips the k + S steps
        if SUMS > 0:
            if (last + 1) // CHUNK > r0 // CHUNK:
                offs_s, ok_s = _block_summary_rows(r0, last, CHUNK, SUMS, SUM_ROWS)
                q_s = tl.load(QS + s0 * stride_qst + h * stride_qsh + offs_s[:, None] * stride_qst + offs_d[None, :],
                              mask=ok_s[:, None], other=0.0).to(tl.float32)
                acc_s, l_s, m_s = _sum_rows_fwd(q_s, k_ev, v_ev, stride_kt, stride_vt, k_sum, v_sum, stride_kst,
                                                stride_vst, offs_s, ok_s, qk_scale, SUM_ROWS, CHUNK, SUMS, HEAD_DIM)
                _fwd_store(acc_s, l_s, m_s, OS + s0 * stride_ost + h * stride_osh, stride_ost, LSES + h * TS + s0,
                           offs_s, ok_s, HEAD_DIM)


# ---- summary queries: k + S keys a row, one key a step ---------------------------------------------------

@triton.jit
def _sum_row_keys(ptr, stride, rows, ok, HEAD_DIM: tl.constexpr):
    """One key (or value) row per query row: ``[ROWS, D]`` fp32, zero where not ``ok``."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + rows[:, None] * stride + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _sum_row_step(step, ev_lo, sum_lo, sum_hi, row_ok, k_ev, v_ev, stride_k, stride_v, k_sum, v_sum, stride_ks,
                  stride_vs, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Key and value ``[ROWS, D]`` (fp32) of step ``step`` of summary rows whose keys are the events
    ``[ev_lo, ev_lo + k)`` (all visible), then the slots ``[sum_lo, sum_hi)`` of their chunk; and where visible."""
    is_ev = step < CHUNK
    row = tl.where(is_ev, ev_lo + step, sum_lo + step - CHUNK)
    vis = row_ok & (is_ev | (row < sum_hi))
    k = _sum_row_keys(tl.where(is_ev, k_ev, k_sum), tl.where(is_ev, stride_k, stride_ks), row, vis, HEAD_DIM)
    v = _sum_row_keys(tl.where(is_ev, v_ev, v_sum), tl.where(is_ev, stride_v, stride_vs), row, vis, HEAD_DIM)
    return k, v, vis


@triton.jit
def _sum_rows_fwd(q, k_ev, v_ev, stride_k, stride_v, k_sum, v_sum, stride_ks, stride_vs, offs, row_ok, qk_scale,
                  ROWS: tl.constexpr, CHUNK: tl.constexpr, SUMS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Online softmax of summary query rows ``offs`` (user-local; q ``[ROWS, D]`` fp32) over the k events of
    their chunk, then their chunk's slots up to their own, one key a step.

    A summary row sees k + S keys (KSA.md section 3): a matmul tile would compute a score for every
    (row, key) of the tile and keep 1 in 16 or fewer, so rows are walked elementwise instead: each
    step loads every row's own key (``[ROWS, D]``) and reduces over D. Returns ``(acc, l, m)`` as
    ``_fwd_walk`` does. Every row has a visible key (its chunk's first event), so m is finite after step 0.
    """
    ev_lo, _ = _qsum_kev(offs, CHUNK, SUMS)
    sum_lo, sum_hi = _qsum_ksum(offs, SUMS)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    for step in range(CHUNK + SUMS):
        k, v, vis = _sum_row_step(step, ev_lo, sum_lo, sum_hi, row_ok, k_ev, v_ev, stride_k, stride_v, k_sum, v_sum,
                                  stride_ks, stride_vs, CHUNK, HEAD_DIM)
        score = tl.where(vis | ~row_ok, tl.sum(q * k, 1) * qk_scale, MASKED_SCORE)
        m_new = tl.maximum(m_i, score)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(score - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m_i = m_new
    return acc, l_i, m_i


# ---- block tables ----------------------------------------------------------------------------------------

@triton.jit
def _plan_rows(TABLE, COST, EV_OFF, LENGTHS, SUM_OFF, b, j0, first, n_blocks, W, M, BLOCK: tl.constexpr,
               CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr, KIND: tl.constexpr,
               HAS_SUM: tl.constexpr, TILE: tl.constexpr):
    j = j0 + tl.arange(0, TILE)
    ok = j < n_blocks
    row = first + j
    n = tl.load(LENGTHS + b).to(tl.int32)
    start = j * BLOCK
    tl.store(TABLE + row * 4, tl.load(EV_OFF + b).to(tl.int32), mask=ok)
    tl.store(TABLE + row * 4 + 1, n, mask=ok)
    tl.store(TABLE + row * 4 + 2, tl.load(SUM_OFF + b).to(tl.int32), mask=ok)
    tl.store(TABLE + row * 4 + 3, start, mask=ok)
    if KIND == 1:  # event-query block: keys it visits
        last = tl.minimum(start + BLOCK, n) - 1
        lo, _ = _qev_kev(start, UNIT, W)
        cost = last + 1 - lo
        if HAS_SUM:
            lo, _ = _qev_ksum(start, CHUNK, SUMS, W, M)
            _, hi = _qev_ksum(last, CHUNK, SUMS, W, M)
            cost += hi - lo
    elif KIND == 2:  # summary-key block: event queries that see it
        last = tl.minimum(start + BLOCK, n // CHUNK * SUMS) - 1
        lo, _ = _ksum_qev(start, n, CHUNK, SUMS, W, M)
        _, hi = _ksum_qev(last, n, CHUNK, SUMS, W, M)
        cost = hi - lo
    else:
        cost = start
    tl.store(COST + row, cost, mask=ok)


@triton.jit
def ksa_plan_kernel(TABLE, COST, EV_OFF, LENGTHS, SUM_OFF, ROWS, CUM, n_users, upper, W, M, BLOCK: tl.constexpr,
                    CHUNK: tl.constexpr, SUMS: tl.constexpr, UNIT: tl.constexpr, KIND: tl.constexpr,
                    HAS_SUM: tl.constexpr, TILE: tl.constexpr, INTERPRET: tl.constexpr):
    """Block table of one stream: program b < n_users writes the rows of user b's blocks of BLOCK rows
    (``ROWS[b]`` rows, table rows ``CUM[b] - cdiv(ROWS[b], BLOCK) ..`` with ``CUM`` the inclusive
    cumsum of the block counts); program n_users marks rows ``CUM[-1] .. upper`` as padding.

    TABLE int32 ``[upper, 4]`` = (event offset, n, summary offset, first row or -1); COST int32
    ``[upper]`` = work estimate used to launch heavy blocks first (KIND 1: event queries, keys they
    visit; KIND 2: summary keys, event queries that see them; else: unused), -1 for padding.
    """
    b = tl.program_id(0)
    if b < n_users:
        end = tl.load(CUM + b).to(tl.int32)
        n_blocks = (tl.load(ROWS + b).to(tl.int32) + BLOCK - 1) // BLOCK
        first = end - n_blocks
        # (while under the interpreter: see _fwd_walk)
        if INTERPRET:
            j0 = 0
            while j0 < n_blocks:
                _plan_rows(TABLE, COST, EV_OFF, LENGTHS, SUM_OFF, b, j0, first, n_blocks, W, M, BLOCK, CHUNK,
                           SUMS, UNIT, KIND, HAS_SUM, TILE)
                j0 += TILE
        else:
            for j0 in range(0, n_blocks, TILE):
                _plan_rows(TABLE, COST, EV_OFF, LENGTHS, SUM_OFF, b, j0, first, n_blocks, W, M, BLOCK, CHUNK,
                           SUMS, UNIT, KIND, HAS_SUM, TILE)
    else:
        total = tl.load(CUM + n_users - 1).to(tl.int32)
        if INTERPRET:
            r0 = total
            while r0 < upper:
                rows = r0 + tl.arange(0, TILE)
                tl.store(TABLE + rows * 4 + 3, -1, mask=rows < upper)
                tl.store(COST + rows, -1, mask=rows < upper)
                r0 += TILE
        else:
            for r0 in range(total, upper, TILE):
                rows = r0 + tl.arange(0, TILE)
                tl.store(TABLE + rows * 4 + 3, -1, mask=rows < upper)
                tl.store(COST + rows, -1, mask=rows < upper)
