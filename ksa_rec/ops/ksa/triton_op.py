"""Launcher and autograd Function of the KSA Triton kernels (``triton_fwd.py``, ``triton_bwd.py``).

``ksa_attention_triton`` has the contract of ``ksa_rec.ops.ksa.dense.ksa_dense`` (the oracle) and is
what ``ksa_rec.ops.ksa_attention(..., backend="triton")`` calls. Design notes: TRITON.md next to this
file. On a CPU machine the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be
in the environment before ``ksa_rec.ops.ksa.triton_fwd`` is first imported (Triton decides at
decoration time); nothing here compiles or launches at import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from ksa_rec.ops.ksa.rule import KsaRule
from ksa_rec.ops.ksa.triton_bwd import ksa_bwd_dkdv_kernel, ksa_bwd_dq_kernel, ksa_bwd_preprocess_kernel
from ksa_rec.ops.ksa.triton_fwd import ksa_fwd_kernel, ksa_plan_kernel

# window=None / max_summaries=None are passed to the kernels as this many chunks: larger than any
# user's chunk count, small enough that c + W + M (chunk numbers) never overflows int32.
UNBOUNDED = 1 << 29
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KsaTritonConfig:
    """Tile sizes (powers of two >= 16) and launch parameters of the three kernels.

    ``block_m`` event queries per forward program, ``block_n`` key rows per forward tile (a forward or
    dQ program also computes the summary queries of the chunks that end in its block: they see k + S
    keys each, walked one key a step, not in matmul tiles);
    ``dkdv_block_n`` key rows per dK/dV program, walking query tiles of ``dkdv_block_m``;
    ``dq_block_m`` queries per dQ program, walking key tiles of ``dq_block_n``.
    ``deterministic=False`` accumulates the event queries' dQ with fp32 atomics inside the dK/dV kernel
    (5 instead of 7 matmuls per visible tile in backward, results vary in the last bits run to run).
    ``nan_fill`` (debug/tests): outputs and gradients start as NaN so an unwritten element shows.
    """

    block_m: int = 64
    block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 3
    dkdv_block_n: int = 64
    dkdv_block_m: int = 32
    dkdv_warps: int = 4
    dkdv_stages: int = 3
    dq_block_m: int = 64
    dq_block_n: int = 64
    dq_warps: int = 4
    dq_stages: int = 3
    # measured faster than atomic dQ at L >= 4K on an H100 (TRITON.md section 4), and reproducible
    deterministic: bool = True
    nan_fill: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "dkdv_block_n", "dkdv_block_m", "dq_block_m", "dq_block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"KsaTritonConfig.{name} must be a power of two >= 16, got {val}")


def default_config(head_dim: int, dtype: torch.dtype) -> KsaTritonConfig:
    """Tiles per head dim and dtype (TRITON.md section 6). D <= 64, fp16/bf16: the fastest of the
    ``pipelines/bench_kernels.py --suites sweep`` on an H100 (64-row tiles, 4 warps: 2-3 programs per SM).
    D = 128: 128-row tiles with 32-key steps (64-row tiles spill in dK/dV there). fp32 (tests,
    debugging) runs its matmuls as 3xTF32 with small tiles so that the fp32 tiles fit in shared memory."""
    if dtype == torch.float32:
        return KsaTritonConfig(block_m=64, block_n=32, fwd_warps=4, fwd_stages=2, dkdv_block_n=64, dkdv_block_m=32,
                               dkdv_warps=4, dkdv_stages=2, dq_block_m=64, dq_block_n=32, dq_warps=4, dq_stages=2)
    if head_dim >= 128:
        return KsaTritonConfig(block_m=128, block_n=32, fwd_warps=8, dkdv_block_n=128, dkdv_block_m=32, dkdv_warps=8,
                               dq_block_m=128, dq_block_n=32, dq_warps=8)
    return KsaTritonConfig()


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(ksa_fwd_kernel, InterpretedFunction)


# ---- block tables --------------------------------------------------------------------------------------

def _upper_blocks(total: int, users: int, block: int) -> int:
    """Host-side bound on ``sum_b cdiv(rows_b, block)`` from the total only (no device sync)."""
    return 0 if total == 0 else min(total, (total + users * (block - 1)) // block)


@dataclass(frozen=True)
class _Spec:
    chunk: int
    sums: int
    unit: int
    window: int
    max_sum: int
    has_sum: bool
    scale: float
    cfg: KsaTritonConfig


class _Plan:
    """Block tables of one jagged batch (device tensors, built without a host sync): int32 ``[G, 4]``
    rows ``(event offset, n, summary offset, first row)``, first row -1 for padding, G a host-side
    upper bound. Each costs a cumsum and one ``ksa_plan_kernel`` launch (plus an argsort for the
    tables launched heaviest first), so short sequences do not drown in launch overhead."""

    def __init__(self, offsets: Tensor, total: int, total_sum: int, spec: _Spec):
        self.spec = spec
        self.total, self.total_sum = total, total_sum
        self.source = offsets  # what _shared_plan compares (the caller's tensor, before any cast)
        self.users = offsets.numel() - 1
        offsets = offsets.to(torch.int64)
        self.ev_off = offsets[:-1]
        self.lengths = offsets[1:] - self.ev_off
        self.n_sum = torch.div(self.lengths, spec.chunk, rounding_mode="floor") * spec.sums
        self.sum_off = torch.cumsum(self.n_sum, 0) - self.n_sum
        self._built: dict[tuple[bool, int, int], Tensor] = {}

    def _table(self, events: bool, block: int, kind: int) -> Tensor:
        """Rows of the event (``events``) or summary stream in tiles of ``block``, built once per
        (stream, block, kind). kind 1 / 2: sorted by decreasing work (longest-processing-time order: long
        programs start first, short ones fill the tail); kind 0: user-major order."""
        key = (events, block, kind)
        if key not in self._built:
            rows, total = (self.lengths, self.total) if events else (self.n_sum, self.total_sum)
            self._built[key] = self._build(rows, total, block, kind)
        return self._built[key]

    def _build(self, rows: Tensor, total: int, block: int, kind: int) -> Tensor:
        s = self.spec
        upper = _upper_blocks(total, self.users, block)
        table = torch.empty((upper, 4), dtype=torch.int32, device=rows.device)
        if upper == 0:
            return table
        cost = torch.empty(upper, dtype=torch.int32, device=rows.device)
        cum = torch.cumsum(torch.div(rows + (block - 1), block, rounding_mode="floor"), 0)
        ksa_plan_kernel[(self.users + 1,)](
            table, cost, self.ev_off, self.lengths, self.sum_off, rows, cum, self.users, upper, s.window, s.max_sum,
            BLOCK=block, CHUNK=s.chunk, SUMS=s.sums, UNIT=s.unit, KIND=kind, HAS_SUM=s.has_sum, TILE=256,
            INTERPRET=_interpreting(),
        )
        if kind:
            table = table[torch.argsort(cost, descending=True)]
        return table

    def event_queries(self, block: int) -> Tensor:
        return self._table(True, block, kind=1)

    def event_keys(self, block: int) -> Tensor:
        return self._table(True, block, kind=0)

    def summary_keys(self, block: int) -> Tensor:
        return self._table(False, block, kind=2 if self.spec.has_sum else 0)


def _shared_plan(tables: dict | None, offsets: Tensor, total: int, total_sum: int, spec: _Spec) -> _Plan:
    """The plan of this batch and rule from ``tables`` (built there on first use), or a new one."""
    if tables is None:
        return _Plan(offsets, total, total_sum, spec)
    key = ("ksa_triton_plan", spec, total, total_sum)
    plan = tables.get(key)
    if plan is None or plan.source is not offsets:
        plan = tables[key] = _Plan(offsets, total, total_sum, spec)
    return plan


# ---- launches ------------------------------------------------------------------------------------------

def _alloc(shape, like: Tensor, dtype=None, nan_fill: bool = False) -> Tensor:
    dtype = like.dtype if dtype is None else dtype
    if nan_fill:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _common_meta(q: Tensor, k: Tensor, spec: _Spec) -> dict:
    return dict(
        GROUP=q.shape[1] // k.shape[1], CHUNK=spec.chunk, SUMS=spec.sums, UNIT=spec.unit, HEAD_DIM=q.shape[2],
        HAS_SUM=spec.has_sum,
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else None, INTERPRET=_interpreting(),
    )


def _strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in (t.stride(0), t.stride(1))]


def sum_rows_per_block(block_m: int, chunk: int, sums: int) -> int:
    """Summary rows an event-query program of ``block_m`` rows computes (a power of two): the S slots of
    each chunk that ends in its block, at most ``cdiv(block_m, k)`` chunks (``triton_fwd._block_summary_rows``)."""
    rows = -(-block_m // chunk) * max(sums, 1)
    return 1 << (rows - 1).bit_length()


def _forward(q, k, v, qs, ks, vs, plan: _Plan):
    """Returns ``out [T, H, D]``, ``out_sum [Ts, H, D]``, ``lse [H, T]``, ``lse_sum [H, Ts]``, the event table."""
    spec, cfg = plan.spec, plan.spec.cfg
    (T, H, D), Ts = q.shape, qs.shape[0]
    out = _alloc((T, H, D), q, nan_fill=cfg.nan_fill)
    out_s = _alloc((Ts, H, D), q, nan_fill=cfg.nan_fill)
    lse = _alloc((H, T), q, torch.float32, cfg.nan_fill)
    lse_s = _alloc((H, Ts), q, torch.float32, cfg.nan_fill)
    ev_table = plan.event_queries(cfg.block_m)
    if ev_table.shape[0]:
        # an empty summary stream is never dereferenced (no chunk is complete: every summary row is masked)
        qs_, ks_, vs_, os_, lses_ = (qs, ks, vs, out_s, lse_s) if Ts else (q, k, v, out, lse)
        ksa_fwd_kernel[(ev_table.shape[0] * H,)](
            q, k, v, qs_, ks_, vs_, out, os_, lse, lses_, ev_table,
            *_strides(q, k, v, out, qs_, ks_, vs_, os_),
            T, Ts, spec.scale * _LOG2E, spec.window, spec.max_sum,
            H=H, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            SUM_ROWS=sum_rows_per_block(cfg.block_m, spec.chunk, spec.sums), **_common_meta(q, k, spec),
            num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        )
    return out, out_s, lse, lse_s, ev_table


def _delta(out: Tensor, d_out: Tensor, nan_fill: bool) -> Tensor:
    rows, H, D = out.shape
    delta = _alloc((H, rows), out, torch.float32, nan_fill)
    if rows:
        block = 64
        ksa_bwd_preprocess_kernel[(triton.cdiv(rows, block), H)](out, d_out, delta, rows, H=H, HEAD_DIM=D,
                                                                   BLOCK=block)
    return delta


def _backward(d_out, d_out_s, q, k, v, qs, ks, vs, out, out_s, lse, lse_s, ev_table, plan: _Plan):
    spec, cfg = plan.spec, plan.spec.cfg
    (T, H, D), Ts, HK = q.shape, qs.shape[0], k.shape[1]
    d_out, d_out_s = d_out.contiguous(), d_out_s.contiguous()
    delta = _delta(out, d_out, cfg.nan_fill)
    delta_s = _delta(out_s, d_out_s, cfg.nan_fill)
    dk = _alloc((T, HK, D), k, nan_fill=cfg.nan_fill)
    dv = _alloc((T, HK, D), k, nan_fill=cfg.nan_fill)
    dks = _alloc((Ts, HK, D), k, nan_fill=cfg.nan_fill)
    dvs = _alloc((Ts, HK, D), k, nan_fill=cfg.nan_fill)
    # event queries' dQ: fp32 atomics inside dK/dV, or the dQ kernel's event programs
    dqa = dk if cfg.deterministic else torch.zeros((T, H, D), dtype=torch.float32, device=q.device)
    meta = _common_meta(q, k, spec)
    qk_scale = spec.scale * _LOG2E
    # an empty summary stream is never dereferenced (no summary programs, HAS_SUM is False)
    qs_, ks_, vs_ = (qs, ks, vs) if Ts else (q, k, v)
    dos_, lses_, deltas_ = (d_out_s, lse_s, delta_s) if Ts else (d_out, lse, delta)
    dks_, dvs_ = (dks, dvs) if Ts else (dk, dv)

    # the forward's event-query table serves as event-key table when the block sizes agree (order
    # does not matter for correctness, and all event-key blocks cost about the same)
    evk_table = ev_table if cfg.dkdv_block_n == cfg.block_m else plan.event_keys(cfg.dkdv_block_n)
    sumk_table = plan.summary_keys(cfg.dkdv_block_n)
    n_sum, n_ev = sumk_table.shape[0] * HK, evk_table.shape[0] * HK
    if n_sum + n_ev:
        ksa_bwd_dkdv_kernel[(n_sum + n_ev,)](
            q, k, v, qs_, ks_, vs_, d_out, dos_, lse, lses_, delta, deltas_, dk, dv, dks_, dvs_, dqa,
            evk_table, sumk_table, *_strides(q, k, v, qs_, ks_, vs_),
            T, Ts, n_sum, qk_scale, spec.scale, spec.window, spec.max_sum,
            HK=HK, BLOCK_N=cfg.dkdv_block_n, BLOCK_M=cfg.dkdv_block_m, ATOMIC_DQ=not cfg.deterministic,
            **meta,
            num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
        )

    dq = _alloc((T, H, D), q, nan_fill=cfg.nan_fill) if cfg.deterministic else None
    dqs = _alloc((Ts, H, D), q, nan_fill=cfg.nan_fill)
    dqs_ = dqs if Ts else dqa
    dq_ev_table = ev_table if cfg.dq_block_m == cfg.block_m else plan.event_queries(cfg.dq_block_m)
    # atomic dQ: the launch still runs, for the summary queries (unless there are none)
    if dq_ev_table.shape[0] and (cfg.deterministic or Ts):
        ksa_bwd_dq_kernel[(dq_ev_table.shape[0] * H,)](
            q, k, v, qs_, ks_, vs_, d_out, dos_, lse, lses_, delta, deltas_, dqa if dq is None else dq, dqs_,
            dq_ev_table, *_strides(q, k, v, qs_, ks_, vs_),
            T, Ts, qk_scale, spec.scale, spec.window, spec.max_sum,
            H=H, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
            SUM_ROWS=sum_rows_per_block(cfg.dq_block_m, spec.chunk, spec.sums), EVENT_DQ=cfg.deterministic, **meta,
            num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
        )
    return (dqa.to(q.dtype) if dq is None else dq), dk, dv, dqs, dks, dvs


class _KsaTritonFunction(torch.autograd.Function):
    """Saves q, k, v (both streams), the outputs, the log2-sum-exp per (head, row) and the block tables."""

    @staticmethod
    def forward(ctx, q, k, v, q_sum, k_sum, v_sum, plan: _Plan):
        out, out_s, lse, lse_s, ev_table = _forward(q, k, v, q_sum, k_sum, v_sum, plan)
        ctx.save_for_backward(q, k, v, q_sum, k_sum, v_sum, out, out_s, lse, lse_s, ev_table)
        ctx.plan = plan
        return out, out_s

    @staticmethod
    def backward(ctx, d_out, d_out_s):
        grads = _backward(d_out, d_out_s, *ctx.saved_tensors, ctx.plan)
        return (*grads, None)


def ksa_attention_triton(q: Tensor, k: Tensor, v: Tensor, q_sum: Tensor, k_sum: Tensor, v_sum: Tensor,
                         offsets: Tensor, rule: KsaRule, *, scale: float | None = None,
                         config: KsaTritonConfig | None = None, tables: dict | None = None) -> tuple[Tensor, Tensor]:
    """KSA attention over the two-stream jagged layout with fused Triton kernels (differentiable).

    Shapes: q ``[T, H, D]``, k, v ``[T, Hk, D]`` (``H % Hk == 0``: grouped-query attention when
    ``Hk < H``); q_sum ``[Ts, H, D]``, k_sum, v_sum ``[Ts, Hk, D]`` with user b owning
    ``S * (n_b // k)`` consecutive summary rows (chunk-major, slot-minor); offsets int64 ``[B+1]``.
    Returns ``(out [T, H, D], out_sum [Ts, H, D])`` in the input dtype (fp16, bf16 or fp32; softmax
    and accumulation in fp32; fp32 inputs multiply as 3xTF32, about fp32 accuracy). Semantics of
    ``ksa_dense`` under ``rule`` (KSA.md section 3, ``rule.py``).
    Head dims up to 128; one that is not a power of two >= 16 is zero-padded (the scale uses the
    true D). ``config``: tile sizes (tests use small ones); default ``default_config(D, dtype)``.
    ``tables``: a dict shared by the calls over this ``offsets`` (``ksa_attention``): their block tables are
    built once and reused.
    The batch layout is not validated here (that would need a device sync): offsets must be a valid
    ``[B+1]`` layout of T rows and ``Ts`` must equal ``S * sum_b (n_b // k)``. Rows are indexed in
    int32 within a user: ``n_b * row_stride < 2**31`` (4M events a user at H*D = 512).
    """
    _check(q, k, v, q_sum, k_sum, v_sum, offsets, rule)
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    d_pad = max(16, 1 << (d - 1).bit_length())
    if d_pad > 128:
        raise ValueError(f"ksa_attention_triton supports head dims up to 128, got {d}")
    q, k, v, q_sum, k_sum, v_sum = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, q_sum, k_sum, v_sum))
    if d_pad != d:
        q, k, v, q_sum, k_sum, v_sum = (F.pad(t, (0, d_pad - d)) for t in (q, k, v, q_sum, k_sum, v_sum))
    cfg = default_config(d_pad, q.dtype) if config is None else config
    spec = _Spec(
        chunk=rule.chunk_size, sums=rule.summary_tokens, unit=rule.unit, scale=scale,
        has_sum=rule.window is not None and rule.summary_tokens > 0, cfg=cfg,
        window=UNBOUNDED if rule.window is None else min(rule.window, UNBOUNDED),
        max_sum=UNBOUNDED if rule.max_summaries is None else min(rule.max_summaries, UNBOUNDED),
    )
    plan = _shared_plan(tables, offsets, q.shape[0], q_sum.shape[0], spec)
    out, out_s = _KsaTritonFunction.apply(q, k, v, q_sum, k_sum, v_sum, plan)
    if d_pad != d:
        out, out_s = out[..., :d], out_s[..., :d]
    return out, out_s


def _check(q, k, v, q_sum, k_sum, v_sum, offsets, rule: KsaRule) -> None:
    names = ("q", "k", "v", "q_sum", "k_sum", "v_sum")
    tensors = (q, k, v, q_sum, k_sum, v_sum)
    for name, t in zip(names, tensors):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [rows, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"ksa_attention_triton supports {_DTYPES}, got {q.dtype}")
    T, H, D = q.shape
    HK = k.shape[1]
    if k.shape != (T, HK, D) or v.shape != k.shape:
        raise ValueError(f"k, v must be [{T}, Hk, {D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if H % HK:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HK})")
    Ts = q_sum.shape[0]
    if q_sum.shape != (Ts, H, D) or k_sum.shape != (Ts, HK, D) or v_sum.shape != (Ts, HK, D):
        raise ValueError(f"summary tensors must be [Ts, {H}|{HK}, {D}], got {tuple(q_sum.shape)}, "
                         f"{tuple(k_sum.shape)}, {tuple(v_sum.shape)}")
    if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32) or offsets.device != q.device:
        raise ValueError(f"offsets must be a 1-D int64 tensor [B+1] on {q.device}, got {offsets.dtype} "
                         f"{tuple(offsets.shape)} on {offsets.device}")
    if rule.summary_tokens == 0 and Ts:
        raise ValueError(f"summary_tokens=0 but {Ts} summary rows were given")
    if T >= 1 << 31 or Ts >= 1 << 31:
        raise ValueError("ksa_attention_triton indexes rows with int32: at most 2**31 - 1 rows per stream")
    if _interpreting():
        return
    if not q.is_cuda:
        raise RuntimeError("ksa_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "ksa_rec.ops.ksa.triton_fwd is first imported, to run the kernels on CPU)")
