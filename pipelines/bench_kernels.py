"""Attention kernel benchmark: KSA Triton vs SDPA (full causal) vs FlexAttention (KSA mask) vs the
torch reference, forward and forward+backward (protocol: ../shared/design/BENCHMARKS.md section 4).

How to run (GPU machine, repository root; torch >= 2.11, triton 3.6, no network needed)::

    python pipelines/bench_kernels.py                 # L = 1K, 4K, 16K, 64K; writes docs/results/kernels.{md,png}
    python pipelines/bench_kernels.py --quick         # smoke run: small sizes, a few seconds after compiling
    python pipelines/bench_kernels.py --sweep         # also times alternative KsaTritonConfig tiles
    python pipelines/bench_kernels.py --lengths 16384 65536 --kinds uniform --out /tmp/res
    python pipelines/bench_kernels.py --kinds uniform --suites attention stages   # + per-kernel profile
    python pipelines/bench_kernels.py --plot-from a/kernels.md b/kernels.md --out docs/results  # CPU ok

Batches: B * L = ``--total`` events (65,536), either uniform (B users of L events) or a long-tailed
jagged mix of the same total (lengths log-uniform in [16, L], seeded). H = 8 heads, D = 64, k = 8,
W = 32, S = 1, bf16 by default. SDPA runs padded ``[B, H, L_max, D]``, ``is_causal=True``, flash
backend. FlexAttention is ``ksa_rec.ops.ksa.flex.ksa_attention_flex`` (two-stream packing, compiled;
its block mask is cached per layout, so only the first call pays for it); ``flex-ksa-kernel`` times its
compiled kernel alone on pre-packed inputs, and the "vs Flex" ratios and goals use that one. The torch
reference (``ksa_attention_torch``) is timed at L <= 4K only.

FLOP convention (the one of BENCHMARKS.md's SDPA figures, 445 / 440 TFLOP/s): forward = 4 * pairs * D
* H, where pairs = (query, key) pairs the KSA mask allows, counted exactly from the lengths over both
streams (event and summary queries); backward = 2.5 x forward, so forward+backward = 3.5 x forward.
"Effective TFLOP/s" of every method divides these KSA-needed FLOPs by its time, so the column compares
useful work per second; SDPA's own rate on the causal FLOPs it does (2 * B * H * L^2 * D forward) is
printed beside it as a sanity check against the reference numbers.

Before timing, each batch is checked: the Triton output against the torch reference at one head (fp32)
and against Flex (all heads); an error above ``--max-error`` stops the run. Peak memory is
``torch.cuda.max_memory_allocated`` during one call, minus what was allocated before it (the inputs).
Results: a markdown report (machine, date, command, tables, goal checks) and a log-log plot of ms vs
L in ``--out``; the same table is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from ksa_rec.ops.ksa.flex import _compiled_flex_attention, ksa_attention_flex, ksa_block_mask
from ksa_rec.ops.ksa.layout import summary_offsets
from ksa_rec.ops.ksa.reference import ksa_attention_torch
from ksa_rec.ops.ksa.triton_op import KsaTritonConfig, default_config, ksa_attention_triton
from ksa_rec.utils.jagged import lengths_to_offsets

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BWD_FLOP_FACTOR = 2.5  # backward FLOPs / forward FLOPs (FlashAttention convention, BENCHMARKS.md)
REFERENCE_MAX_L = 4096  # the torch reference is only timed up to here (it is slow)


@dataclass(frozen=True)
class Setup:
    heads: int
    dim: int
    chunk: int
    window: int | None
    sums: int
    dtype: torch.dtype


@dataclass
class Row:
    """One (batch, method) measurement; times in ms, None when the method was not run there."""

    kind: str
    L: int
    users: int
    method: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_mib: float | None = None
    ksa_flops_fwd: float = 0.0
    own_flops_fwd: float = 0.0  # what the method computes itself (SDPA: causal), for its own TFLOP/s
    note: str = ""

    def tflops(self, ms: float | None, factor: float = 1.0, own: bool = False) -> float | None:
        flops = (self.own_flops_fwd if own else self.ksa_flops_fwd) * factor
        return None if ms is None else flops / (ms * 1e-3) / 1e12


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    sweep: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)


# ---- batches and exact FLOP counts ---------------------------------------------------------------------

def make_lengths(kind: str, L: int, total: int, seed: int = 0) -> list[int]:
    """uniform: total // L users of L events; jagged: log-uniform lengths in [16, L] summing to total."""
    if kind == "uniform":
        return [L] * max(1, total // L)
    rng = np.random.default_rng(seed)
    lengths, remaining = [], total
    while remaining > 0:
        n = min(int(math.exp(rng.uniform(math.log(16), math.log(L)))), remaining)
        lengths.append(n)
        remaining -= n
    rng.shuffle(lengths)
    return lengths


def ksa_pairs(lengths: list[int], chunk: int, window: int | None, sums: int, max_summaries: int | None = None) -> int:
    """Visible (query, key) pairs of the KSA rule (KSA.md section 3), both streams, exactly."""
    total = 0
    for n in lengths:
        i = np.arange(n, dtype=np.int64)
        c = i // chunk
        lo = 0 if window is None else np.maximum(c - window, 0) * chunk
        total += int((i + 1 - lo).sum())  # event -> event
        if window is not None and sums:
            old = np.maximum(c - window, 0)
            dropped = 0 if max_summaries is None else np.maximum(c - window - max_summaries, 0)
            total += int(((old - dropped) * sums).sum())  # event -> summary
        n_chunks = n // chunk
        total += n_chunks * sums * chunk + n_chunks * sums * (sums + 1) // 2  # summary -> own chunk
    return total


@dataclass
class Batch:
    kind: str
    L: int
    lengths: list[int]
    offsets: torch.Tensor
    inputs: list[torch.Tensor]  # q, k, v, q_sum, k_sum, v_sum (leaves, requires_grad)
    grads: list[torch.Tensor]  # d out, d out_sum
    padded: list[torch.Tensor]  # SDPA q, k, v [B, H, L_max, D]
    padded_grad: torch.Tensor


def make_batch(kind: str, L: int, total: int, s: Setup, device: str) -> Batch:
    lengths = make_lengths(kind, L, total)
    offsets = lengths_to_offsets(torch.tensor(lengths)).to(device)
    T, Ts = int(offsets[-1]), int(summary_offsets(offsets, s.chunk, s.sums)[-1])
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=s.dtype)

    inputs = [rand(rows, s.heads, s.dim).requires_grad_() for rows in (T, T, T, Ts, Ts, Ts)]
    grads = [rand(T, s.heads, s.dim), rand(Ts, s.heads, s.dim)]
    shape = (len(lengths), s.heads, max(lengths), s.dim)
    padded = [rand(*shape).requires_grad_() for _ in range(3)]
    return Batch(kind, L, lengths, offsets, inputs, grads, padded, rand(*shape))


# ---- methods -------------------------------------------------------------------------------------------

def ksa_kwargs(s: Setup) -> dict:
    return dict(chunk_size=s.chunk, window=s.window, summary_tokens=s.sums)


def method_fns(batch: Batch, s: Setup, config: KsaTritonConfig,
               methods: list[str]) -> dict[str, tuple[Callable, list, list]]:
    """name -> (call returning output tensors, leaves that get gradients, output gradients), for the
    requested ``methods``."""
    kw = ksa_kwargs(s)
    ksa_in, pad_in = batch.inputs, batch.padded
    atomic = replace(config, deterministic=False)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return (F.scaled_dot_product_attention(*pad_in, is_causal=True),)

    fns = {
        "ksa-triton": (lambda: ksa_attention_triton(*ksa_in, batch.offsets, config=config, **kw), ksa_in, batch.grads),
        "ksa-triton-atomic-dq": (lambda: ksa_attention_triton(*ksa_in, batch.offsets, config=atomic, **kw), ksa_in,
                                 batch.grads),
        "sdpa-causal": (sdpa, pad_in, [batch.padded_grad]),
        "flex-ksa": (lambda: ksa_attention_flex(*ksa_in, batch.offsets, **kw), ksa_in, batch.grads),
    }
    if "flex-ksa-kernel" in methods:  # packs copies of the inputs: only when asked for
        fns["flex-ksa-kernel"] = flex_kernel_fn(batch, s)
    if batch.L <= REFERENCE_MAX_L:
        fns["torch-ref"] = (lambda: ksa_attention_torch(*ksa_in, batch.offsets, **kw), ksa_in, batch.grads)
    return {name: fn for name, fn in fns.items() if name in methods}


def flex_kernel_fn(batch: Batch, s: Setup) -> tuple[Callable, list, list]:
    """FlexAttention's compiled kernel alone, on the packed ``[1, H, T + Ts + pad, D]`` sequence with the
    cached block mask: what ``ksa_attention_flex`` runs, without its per-call host work (offsets to
    a tuple, cache lookup, packing and unpacking copies)."""
    mask = ksa_block_mask(tuple(batch.offsets.tolist()), str(batch.offsets.device), s.chunk, s.window, s.sums,
                          None)
    rows = batch.inputs[0].shape[0] + batch.inputs[3].shape[0]

    def pack(events: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        pad = events.new_zeros(mask.shape[-2] - rows, *events.shape[1:])
        return torch.cat([events, summaries, pad]).transpose(0, 1).unsqueeze(0).detach().contiguous()

    packed = [pack(batch.inputs[i], batch.inputs[i + 3]).requires_grad_() for i in range(3)]
    grad = pack(*batch.grads)
    flex = _compiled_flex_attention()
    return (lambda: (flex(*packed, block_mask=mask, scale=s.dim ** -0.5),)), packed, [grad]


def time_ms(fn: Callable, leaves: list, grads: list, backward: bool, warmup: int, rep: int) -> float:
    if not backward:
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            torch.autograd.backward(fn(), grads)
    return do_bench(run, warmup=warmup, rep=rep, grad_to_none=leaves if backward else None, return_mode="median")


def peak_mib(fn: Callable, leaves: list, grads: list) -> float:
    """Peak memory above what was allocated before one forward+backward call (inputs and output
    gradients; the input gradients left by the timing loops are dropped first)."""
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.backward(fn(), grads)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---- correctness pre-check -------------------------------------------------------------------------------

@torch.no_grad()
def precheck(batch: Batch, s: Setup, config: KsaTritonConfig, max_error: float) -> str:
    """Triton vs the torch reference at head 0 (fp32) and vs Flex (all heads); raises above max_error."""
    kw = ksa_kwargs(s)
    got = ksa_attention_triton(*batch.inputs, batch.offsets, config=config, **kw)
    head0 = [t[:, :1].float() for t in batch.inputs]
    ref = ksa_attention_torch(*head0, batch.offsets, **kw)
    flex = ksa_attention_flex(*batch.inputs, batch.offsets, **kw)

    def err(a, b):
        return max(((x.float() - y.float()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))

    err_ref = err([g[:, :1] for g in got], ref)
    err_flex = err(got, flex)
    line = f"{batch.kind} L={batch.L}: max |triton - torch ref (fp32, head 0)| = {err_ref:.2e}, " \
           f"max |triton - flex| = {err_flex:.2e}"
    if max(err_ref, err_flex) > max_error:
        raise SystemExit(f"correctness pre-check failed, timings would be meaningless: {line}")
    return line


# ---- suites --------------------------------------------------------------------------------------------

def attention_suite(args, s: Setup, report: Report) -> None:
    """Forward and forward+backward of every method on every (kind, L) batch."""
    config = default_config(s.dim, s.dtype)
    for kind in args.kinds:
        for L in args.lengths:
            batch = make_batch(kind, L, args.total, s, "cuda")
            report.checks.append(precheck(batch, s, config, args.max_error))
            print(report.checks[-1], flush=True)
            ksa_fwd = 4.0 * ksa_pairs(batch.lengths, s.chunk, s.window, s.sums) * s.dim * s.heads
            causal_fwd = 2.0 * len(batch.lengths) * s.heads * max(batch.lengths) ** 2 * s.dim
            for name, (fn, leaves, grads) in method_fns(batch, s, config, args.methods).items():
                row = Row(kind, L, len(batch.lengths), name, ksa_flops_fwd=ksa_fwd,
                          own_flops_fwd=causal_fwd if name == "sdpa-causal" else ksa_fwd)
                try:
                    row.fwd_ms = time_ms(fn, leaves, grads, False, args.warmup, args.rep)
                    row.fwd_bwd_ms = time_ms(fn, leaves, grads, True, args.warmup, args.rep)
                    row.peak_mib = peak_mib(fn, leaves, grads)
                except torch.cuda.OutOfMemoryError:
                    row.note = "out of memory"
                    torch.cuda.empty_cache()
                report.rows.append(row)
                print(format_row(row), flush=True)
            del batch
            torch.cuda.empty_cache()
            write_report(report, s, args, args.out)  # after every batch: a timeout keeps what was measured


def sweep_suite(args, s: Setup, report: Report) -> None:
    """Alternative tiles for the forward and the backward kernels (default first), uniform batches."""
    base = default_config(s.dim, s.dtype)
    # (block_m, block_n, warps, stages); the first is the default, then the previous (128-row, 8-warp) one
    fwd_tiles = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 32, 4, 3), (64, 128, 4, 2), (64, 64, 4, 4)]
    # (dK/dV: keys, queries, warps, stages; dQ: queries, keys, warps, stages)
    bwd_tiles = [(64, 32, 4, 3, 64, 64, 4, 3), (128, 32, 8, 3, 128, 32, 8, 3), (64, 64, 4, 3, 64, 64, 4, 3),
                 (64, 32, 4, 3, 128, 32, 8, 3), (64, 32, 4, 4, 64, 64, 4, 4), (64, 32, 4, 3, 64, 32, 4, 3)]
    kw = ksa_kwargs(s)
    for L in args.lengths:
        batch = make_batch("uniform", L, args.total, s, "cuda")
        report.sweep.append(f"| uniform L={L} | | |")

        def timed(cfg: KsaTritonConfig, backward: bool) -> str:
            try:
                ms = time_ms(lambda: ksa_attention_triton(*batch.inputs, batch.offsets, config=cfg, **kw),
                             batch.inputs, batch.grads, backward, args.warmup, args.rep)
            except triton.runtime.errors.OutOfResources as err:  # a tile that does not fit: skip, keep going
                return f"does not fit ({err})"
            return f"{ms:.3f}"

        for bm, bn, warps, stages in fwd_tiles:
            cfg = replace(base, block_m=bm, block_n=bn, fwd_warps=warps, fwd_stages=stages)
            report.sweep.append(f"| fwd block_m={bm} block_n={bn} warps={warps} stages={stages} | "
                                f"{timed(cfg, False)} | |")
            print(report.sweep[-1], flush=True)
        for kn, km, kwarps, kstages, qm, qn, qwarps, qstages in bwd_tiles:
            cfg = replace(base, dkdv_block_n=kn, dkdv_block_m=km, dkdv_warps=kwarps, dkdv_stages=kstages,
                          dq_block_m=qm, dq_block_n=qn, dq_warps=qwarps, dq_stages=qstages)
            report.sweep.append(f"| fwd+bwd dkdv {kn}x{km} w{kwarps} s{kstages}, dq {qm}x{qn} w{qwarps} s{qstages} "
                                f"| | {timed(cfg, True)} |")
            print(report.sweep[-1], flush=True)
        del batch
        torch.cuda.empty_cache()
        write_report(report, s, args, args.out)


# matmuls each Triton kernel runs per visible (query, key) tile pair: forward QK^T, PV; dK/dV: S^T,
# dV, dP^T, dK (+ dQ with atomics); dQ: S, dP, dQ. Used for the per-kernel rate on KSA-needed pairs.
KERNEL_MATMULS = {"ksa_fwd_kernel": 2, "ksa_bwd_dkdv_kernel": 4, "ksa_bwd_dq_kernel": 3}


def stages_suite(args, s: Setup, report: Report) -> None:
    """Where forward+backward time goes: per-kernel device time (torch.profiler) of the Triton op on
    uniform batches, deterministic vs atomic-dQ backward, and without the summary stream (S = 0: the
    event band alone, so the summary part is the difference)."""
    from torch.profiler import ProfilerActivity, profile

    base = default_config(s.dim, s.dtype)
    iters = 10
    for L in args.lengths:
        batch = make_batch("uniform", L, args.total, s, "cuda")
        q, k, v, qs, ks, vs = batch.inputs
        no_sum = [t[:0].detach().requires_grad_() for t in (qs, ks, vs)]
        variants = [("deterministic", base, s.sums, batch.inputs, batch.grads),
                    ("atomic-dQ", replace(base, deterministic=False), s.sums, batch.inputs, batch.grads),
                    ("S=0 (event band only)", base, 0, [q, k, v, *no_sum], [batch.grads[0], batch.grads[1][:0]])]
        for name, cfg, sums, inputs, grads in variants:
            pairs = ksa_pairs(batch.lengths, s.chunk, s.window, sums)
            kw = dict(chunk_size=s.chunk, window=s.window, summary_tokens=sums)

            def step():
                torch.autograd.backward(ksa_attention_triton(*inputs, batch.offsets, config=cfg, **kw), grads)
                for leaf in inputs:
                    leaf.grad = None

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    step()
                torch.cuda.synchronize()
            times: dict[str, float] = {}
            for evt in prof.key_averages():
                if evt.self_device_time_total > 0:
                    key = evt.key if evt.key.startswith("ksa_") else "other (torch glue: tables, sort, fills, casts)"
                    times[key] = times.get(key, 0.0) + evt.self_device_time_total / 1e3 / iters
            total = sum(times.values())
            for kernel, ms in sorted(times.items(), key=lambda kv: -kv[1]):
                mm = KERNEL_MATMULS.get(kernel, 0) + (kernel == "ksa_bwd_dkdv_kernel" and not cfg.deterministic)
                rate = f"{2 * mm * pairs * s.dim * s.heads / (ms * 1e-3) / 1e12:.0f}" if mm else "-"
                report.stages.append(f"| {L} | {name} | {kernel} | {ms:.3f} | {ms / total:.0%} | {rate} |")
                print(report.stages[-1], flush=True)
            report.stages.append(f"| {L} | {name} | total (device time) | {total:.3f} | 100% | "
                                 f"{3.5 * 4 * pairs * s.dim * s.heads / (total * 1e-3) / 1e12:.0f} (KSA fwd+bwd) |")
            print(report.stages[-1], flush=True)
        del batch
        torch.cuda.empty_cache()
        write_report(report, s, args, args.out)


SUITES = {"attention": attention_suite, "sweep": sweep_suite, "stages": stages_suite}


# ---- report --------------------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{b / a:.2f}x"


def format_row(r: Row) -> str:
    own = f" (own causal {_f(r.tflops(r.fwd_bwd_ms, 1 + BWD_FLOP_FACTOR, own=True), 0)})" \
        if r.method == "sdpa-causal" else ""
    return (f"{r.kind:8s} L={r.L:6d} {r.method:22s} fwd {_f(r.fwd_ms):>8s} ms  fwd+bwd {_f(r.fwd_bwd_ms):>8s} ms  "
            f"{_f(r.tflops(r.fwd_bwd_ms, 1 + BWD_FLOP_FACTOR), 0):>5s} TFLOP/s{own}  {r.note}")


def table(rows: list[Row]) -> list[str]:
    lines = ["| batch | L | users | method | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak MiB "
             "(fwd+bwd) | speed-up vs SDPA fwd / fwd+bwd | vs Flex fwd / fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = [x for x in rows if x.kind == r.kind and x.L == r.L]
        sdpa = next((x for x in same if x.method == "sdpa-causal"), None)
        flex = _flex_row(same)
        tf_fwd, tf_all = _f(r.tflops(r.fwd_ms), 0), _f(r.tflops(r.fwd_bwd_ms, 1 + BWD_FLOP_FACTOR), 0)
        if r.method == "sdpa-causal":
            tf_fwd += f" (own {_f(r.tflops(r.fwd_ms, own=True), 0)})"
            tf_all += f" (own {_f(r.tflops(r.fwd_bwd_ms, 1 + BWD_FLOP_FACTOR, own=True), 0)})"
        vs_sdpa = "-" if sdpa is None else f"{_ratio(r.fwd_ms, sdpa.fwd_ms)} / {_ratio(r.fwd_bwd_ms, sdpa.fwd_bwd_ms)}"
        vs_flex = "-" if flex is None else f"{_ratio(r.fwd_ms, flex.fwd_ms)} / {_ratio(r.fwd_bwd_ms, flex.fwd_bwd_ms)}"
        lines.append(f"| {r.kind} | {r.L} | {r.users} | {r.method}{' (' + r.note + ')' if r.note else ''} | "
                     f"{_f(r.fwd_ms)} | {_f(r.fwd_bwd_ms)} | {tf_fwd} | {tf_all} | {_f(r.peak_mib, 0)} | "
                     f"{vs_sdpa} | {vs_flex} |")
    return lines


def _flex_row(rows: list[Row]) -> Row | None:
    """Flex's kernel alone when it was measured (the faster, conservative baseline), else the wrapper."""
    by_method = {r.method: r for r in rows}
    return by_method.get("flex-ksa-kernel") or by_method.get("flex-ksa")


def goal_checks(rows: list[Row]) -> list[str]:
    """The targets of the Triton issue, on uniform batches (fwd+bwd)."""
    def get(L, method):
        return next((r for r in rows if r.kind == "uniform" and r.L == L and r.method == method
                     and r.fwd_bwd_ms is not None), None)

    out = []
    for L, goal_sdpa, goal_flex in ((16384, 3.0, 1.3), (65536, 5.0, None)):
        ksa, sdpa = get(L, "ksa-triton"), get(L, "sdpa-causal")
        flex = get(L, "flex-ksa-kernel") or get(L, "flex-ksa")
        if ksa and sdpa:
            x = sdpa.fwd_bwd_ms / ksa.fwd_bwd_ms
            out.append(f"- L={L}: fwd+bwd {x:.2f}x faster than SDPA causal (goal >= {goal_sdpa}x): "
                       f"{'met' if x >= goal_sdpa else 'NOT met'}")
            share = ksa.tflops(ksa.fwd_bwd_ms, 1 + BWD_FLOP_FACTOR) / sdpa.tflops(
                sdpa.fwd_bwd_ms, 1 + BWD_FLOP_FACTOR, own=True)
            out.append(f"- L={L}: effective fwd+bwd throughput {share:.0%} of SDPA's causal TFLOP/s (goal >= 60%): "
                       f"{'met' if share >= 0.6 else 'NOT met'}")
        if ksa and flex and goal_flex:
            x = flex.fwd_bwd_ms / ksa.fwd_bwd_ms
            out.append(f"- L={L}: fwd+bwd {x:.2f}x faster than {flex.method} (goal >= {goal_flex}x): "
                       f"{'met' if x >= goal_flex else 'NOT met'}")
    return out


def write_report(report: Report, s: Setup, args, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Attention kernels: KSA Triton vs SDPA vs FlexAttention",
        "",
        f"- machine: {torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__})",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- setup: B*L = {args.total} events, H = {s.heads}, D = {s.dim}, k = {s.chunk}, W = {s.window}, "
        f"S = {s.sums}, {str(s.dtype).replace('torch.', '')}; median of triton.testing.do_bench",
        "- FLOPs: forward = 4 * (KSA-visible query-key pairs, both streams, exact) * D * H; backward = 2.5 x "
        "forward. Every method's TFLOP/s uses these KSA-needed FLOPs; SDPA's rate on its own causal FLOPs "
        "is given as '(own ...)'. Peak MiB: above the inputs, one forward+backward call.",
        "- ksa-triton: deterministic backward (default); ksa-triton-atomic-dq: dQ accumulated with fp32 atomics.",
        "",
        "## Results",
        "",
        *table(report.rows),
        "",
        "## Goals (uniform batches)",
        "",
        *(goal_checks(report.rows) or ["- (not measured in this run)"]),
        "",
        "## Correctness pre-check (bf16 kernel)",
        "",
        *[f"- {c}" for c in report.checks],
    ]
    if report.sweep:
        lines += ["", "## Tile sweep (ms)", "", "| config | fwd | fwd+bwd |", "|---|---|---|", *report.sweep]
    if report.stages:
        lines += ["", "## Where forward+backward time goes (torch.profiler, device time per call)", "",
                  "TFLOP/s: the kernel's own matmuls on the KSA-needed pairs (2 fwd; dK/dV 4, 5 with atomic dQ; "
                  "dQ 3), i.e. its tensor-core rate without the masked-tile overhead.", "",
                  "| L | variant | kernel | ms | share | TFLOP/s |", "|---|---|---|---|---|---|", *report.stages]
    path = out / "kernels.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(rows: list[Row], out: Path) -> Path | None:
    """ms vs L, log-log, one panel per batch kind (solid: forward+backward, dashed: forward)."""
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return None
    kinds = sorted({r.kind for r in rows}, key=lambda kind: kind != "uniform")
    methods = list(dict.fromkeys(r.method for r in rows))
    colors = plt.get_cmap("tab10").colors  # one color per method, in both panels
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, method in enumerate(methods):
            pts = sorted((r for r in rows if r.kind == kind and r.method == method), key=lambda r: r.L)
            for attr, style in (("fwd_bwd_ms", "-o"), ("fwd_ms", "--x")):
                xy = [(r.L, getattr(r, attr)) for r in pts if getattr(r, attr) is not None]
                if xy:
                    ax.plot(*zip(*xy), style, color=colors[i % len(colors)],
                            label=f"{method} {'fwd+bwd' if attr == 'fwd_bwd_ms' else 'fwd'}")
        ax.set(xscale="log", yscale="log", xlabel="L (events per user, B*L fixed)", ylabel="ms", title=kind)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.17, 1, 1))  # room for the shared legend below the panels
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kernels.png"
    fig.savefig(path, dpi=120)
    return path


def rows_from_report(path: Path) -> list[Row]:
    """The Results table of a report written by this script (to plot several runs' pieces together)."""
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not cells[1].isdigit():
            continue
        ms = [None if c == "-" else float(c) for c in cells[4:6]]
        rows.append(Row(cells[0], int(cells[1]), int(cells[2]), cells[3].split(" (")[0], *ms))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--kinds", nargs="+", choices=["uniform", "jagged"], default=["uniform", "jagged"])
    p.add_argument("--methods", nargs="+", default=["ksa-triton", "ksa-triton-atomic-dq", "sdpa-causal", "flex-ksa",
                                                      "flex-ksa-kernel",
                                                      "torch-ref"])
    p.add_argument("--total", type=int, default=65536, help="events per batch (B * L)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--summary-tokens", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--max-error", type=float, default=5e-2, help="pre-check threshold (bf16 outputs are O(1))")
    p.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=["attention"],
                   help="what to run (attention: the comparison table; stages: per-kernel profile; sweep: tiles)")
    p.add_argument("--sweep", action="store_true", help="also time alternative tile configurations")
    p.add_argument("--quick", action="store_true", help="smoke run: L = 256, 1024; 4,096 events; short timing")
    p.add_argument("--plot-from", type=Path, nargs="+",
                   help="only plot the Results tables of these reports (pieces run separately) into --out")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args(argv)
    if args.plot_from:
        print(f"plot: {plot([r for path in args.plot_from for r in rows_from_report(path)], args.out)}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA device (SDPA flash, compiled Flex, Triton kernels)")
    if args.quick:
        args.lengths, args.total, args.warmup, args.rep = [256, 1024], 4096, 5, 20
    s = Setup(args.heads, args.dim, args.chunk, args.window, args.summary_tokens, DTYPES[args.dtype])
    report = Report()
    for name in list(dict.fromkeys(args.suites + (["sweep"] if args.sweep else []))):
        SUITES[name](args, s, report)
    path = write_report(report, s, args, args.out)
    png = plot(report.rows, args.out)
    print("\n".join(["", *table(report.rows), "", *goal_checks(report.rows), "", f"report: {path}",
                     f"plot: {png}" if png else "plot: -"]))


if __name__ == "__main__":
    main()
