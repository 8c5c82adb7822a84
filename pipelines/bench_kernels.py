"""Attention kernel benchmark: KSA Triton against dense causal attention and Flex-KSA, each at its best, in
one run (protocol: ../shared/design/BENCHMARKS.md section 4; issue 16).

How to run (repository root)::

    # GPU machine (torch >= 2.11, triton 3.6): L = 1K, 4K, 16K, 64K; uniform and jagged batches
    python pipelines/bench_kernels.py --out docs/results/raw/kernels-h200-DATE
    python pipelines/bench_kernels.py --kinds uniform --lengths 16384 --flex-tiles default "fwd 128x64"
    python pipelines/bench_kernels.py --kinds uniform --suites sweep stages   # KSA Triton tiles, per-kernel profile
    # CPU smoke run (tiny sizes, fp32; the Triton kernels run in Triton's interpreter): seconds
    TRITON_INTERPRET=1 python pipelines/bench_kernels.py --quick --out /tmp/kernels
    # plot a run: python pipelines/plot_results.py --kernels PREFIX.json --out DIR

Batches: B * L = ``--total`` events (65,536): uniform (B users of L events) and jagged (a long-tailed mix
of the same total: lengths log-uniform in [16, L], seeded). H = 8, D = 64, k = 8, W = 32, S = 1, bf16.

Methods, all on the same batch and timed the same way (``triton.testing.do_bench`` median of the forward
of a training step, autograd on, and of forward+backward; peak memory of one forward+backward above the
inputs):

- dense causal attention (``_dense_attention.py``): SDPA with its own backend choice, SDPA with each
  backend forced (cuDNN, flash, efficient; a refusal is reported as a row), varlen flash without padding,
  FlashAttention-4 where it imports. **"dense fastest"** = the fastest of these in this run.
- Flex-KSA (``_flex_ksa.py``): per-user rows, arithmetic ``mask_mod``, block mask built once, compiled
  flex with static shapes. The first tile setting (Inductor's default) runs on every batch; every setting
  of ``--flex-tiles`` on uniform batches at ``--flex-sweep-lengths`` (each setting and length is a compile
  of its own, ~10 s). The old setup (all users and both streams packed into one sequence) is its own row
  on uniform batches. **"Flex-KSA fastest"** = the fastest Flex row of the batch.
- KSA Triton: ``ksa_rec.ops.ksa.ksa_attention(backend="triton")``, its block tables built once and reused
  across calls (as Flex's block mask is, and as the encoder's layers share them) and, as its own row,
  built in every call; **"KSA Triton"** in the summaries = the faster of the two. The torch reference up
  to ``--reference-max-l``.

FLOPs: forward = 4 * (query-key pairs the KSA mask allows, both streams, counted exactly) * D * H;
backward = 2.5 x forward. Every "TFLOP/s" divides these KSA-needed FLOPs by the method's time, so it is
useful work per second; "share of matmul" divides that by a bf16 ``n x n x n`` matmul measured in the same
run. Dense methods also get "own" TFLOP/s on the causal work they do. Speed-ups are baseline ms / this ms
and name their baseline. Before timing, each batch is checked: KSA Triton against the torch reference
(fp32, head 0) and against per-user Flex (all heads); an error above ``--max-error`` stops the run.

Output (``--out PREFIX``): ``PREFIX.md`` (command, machine, tables, goals) and ``PREFIX.json`` (every row as
measured), rewritten after every batch so a timeout keeps what was measured.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import command, fmt, header, kernel_ms, machine, now, peak_mib, sync, write_outputs  # noqa: E402
from _dense_attention import Call, dense_calls  # noqa: E402
from _flex_ksa import (  # noqa: E402
    TILE_SETTINGS,
    PerUserLayout,
    flex,
    pack_per_user,
    packed_old_setup,
    per_user_block_mask,
    unpack_per_user,
)

from ksa_rec.ops.ksa import KsaRule, ksa_attention  # noqa: E402
from ksa_rec.ops.ksa.layout import summary_offsets  # noqa: E402
from ksa_rec.ops.ksa.triton_op import KsaTritonConfig, default_config, ksa_attention_triton  # noqa: E402
from ksa_rec.utils.jagged import lengths_to_offsets  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FWD_BWD_FACTOR = 3.5  # (forward + backward) / forward FLOPs: backward = 2.5 x forward (FlashAttention convention)
PASSES = (("fwd+bwd", "fwd_bwd_ms", FWD_BWD_FACTOR), ("fwd", "fwd_ms", 1.0))


@dataclass(frozen=True)
class Setup:
    heads: int
    dim: int
    chunk: int
    window: int | None
    sums: int
    dtype: torch.dtype


def ksa_op(inputs: list[torch.Tensor], offsets: torch.Tensor, s: Setup, *, backend: str = "triton",
           config: KsaTritonConfig | None = None, sums: int | None = None, max_summaries: int | None = None,
           tables: dict | None = None):
    """The one place that calls the KSA op. ``config`` (tile experiments) reaches the Triton op itself: the
    dispatcher takes no tiles. ``sums`` / ``max_summaries`` override the setup's rule (stage variants).
    ``tables``: a dict kept across calls, so the Triton op builds its block tables once (None: every call)."""
    rule = KsaRule(s.chunk, s.window, s.sums if sums is None else sums, max_summaries)
    if config is not None:
        return ksa_attention_triton(*inputs, offsets, rule, config=config, tables=tables)
    return ksa_attention(*inputs, offsets, rule, backend=backend, check_offsets=False, tables=tables)


@dataclass
class Row:
    """One (batch, method) measurement as taken; ms None where not run (``status`` says why)."""

    kind: str
    L: int
    users: int
    method: str
    group: str
    setting: str = ""
    status: str = "ok"
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_mib: float | None = None
    ksa_flops_fwd: float = 0.0
    own_flops_fwd: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.method} [{self.setting}]" if self.setting else self.method

    def tflops(self, attr: str, factor: float, own: bool = False) -> float | None:
        ms = getattr(self, attr)
        flops = (self.own_flops_fwd if own else self.ksa_flops_fwd) * factor
        return None if ms is None else flops / (ms * 1e-3) / 1e12


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    matmul: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)


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
        c = np.arange(n, dtype=np.int64) // chunk
        lo = 0 if window is None else np.maximum(c - window, 0) * chunk
        total += int((np.arange(1, n + 1) - lo).sum())  # event -> event
        if window is not None and sums:
            seen = np.maximum(c - window, 0)
            if max_summaries is not None:
                seen = seen - np.maximum(c - window - max_summaries, 0)
            total += int((seen * sums).sum())  # event -> summary
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
    gen: torch.Generator

    @property
    def device(self) -> torch.device:
        return self.offsets.device


def make_batch(kind: str, L: int, total: int, s: Setup, device: torch.device) -> Batch:
    lengths = make_lengths(kind, L, total)
    offsets = lengths_to_offsets(torch.tensor(lengths)).to(device)
    T, Ts = int(offsets[-1]), int(summary_offsets(offsets, s.chunk, s.sums)[-1])
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=s.dtype)

    inputs = [rand(rows, s.heads, s.dim).requires_grad_() for rows in (T, T, T, Ts, Ts, Ts)]
    return Batch(kind, L, lengths, offsets, inputs, [rand(T, s.heads, s.dim), rand(Ts, s.heads, s.dim)], gen)


# ---- the methods of one batch --------------------------------------------------------------------------

def flex_calls(batch: Batch, s: Setup, settings: list, ksa_flops: float) -> list[Call]:
    """Per-user Flex-KSA, one call per tile setting, and on uniform batches the old packed setup."""
    dev = batch.device
    backward = dev.type == "cuda"  # eager flex (CPU) has no backward and refuses inputs that require grad
    layout = PerUserLayout(tuple(batch.lengths), s.chunk, s.sums)
    packed = [pack_per_user(batch.inputs[i].detach(), batch.inputs[i + 3].detach(), layout).requires_grad_(backward)
              for i in range(3)]
    grad = pack_per_user(*batch.grads, layout)
    masks: dict[int, tuple] = {}
    calls = []
    for setting in settings:
        if setting.mask_block not in masks:
            block = setting.mask_block
            masks[block] = _built(lambda b=block: per_user_block_mask(layout, s.window, b, dev))
        (mask, why), options = masks[setting.mask_block], setting.kernel_options or None
        calls.append(Call("flex-ksa per-user", "flex-ksa",
                          lambda m=mask, o=options: (flex(dev)(*packed, block_mask=m, scale=s.dim ** -0.5,
                                                               kernel_options=o),),
                          packed, [grad], ksa_flops, setting=setting.name, unavailable=why, has_backward=backward))
    if batch.kind != "uniform":
        return calls
    old, why = _built(lambda: packed_old_setup([t.detach() for t in batch.inputs[:3]],
                                               [t.detach() for t in batch.inputs[3:]], batch.offsets, s.chunk,
                                               s.window, s.sums))
    name = "flex-ksa packed (old setup: one sequence for all users and both streams)"
    if old is None:
        return [*calls, Call(name, "flex-ksa", None, [], [], ksa_flops, unavailable=why)]
    old_mask, old_in, _ = old
    old_in = [t.requires_grad_(backward) for t in old_in]
    _, (old_grad,), _ = packed_old_setup([batch.grads[0]], [batch.grads[1]], batch.offsets, s.chunk, s.window, s.sums)
    calls.append(Call(name, "flex-ksa", lambda: (flex(dev)(*old_in, block_mask=old_mask, scale=s.dim ** -0.5),),
                      old_in, [old_grad], ksa_flops, has_backward=backward))
    return calls


def _built(make):
    """``(make(), None)``, or ``(None, why)`` when it raises: a block mask that cannot be built (out of
    memory, a compile error) becomes a row saying so instead of ending the run."""
    try:
        return make(), None
    except Exception as err:  # noqa: BLE001
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, f"block mask not built ({type(err).__name__}: {_first_line(err)})"


def ksa_calls(batch: Batch, s: Setup, ksa_flops: float, reference_max_l: int) -> list[Call]:
    triton_ok = batch.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    why = None if triton_ok else "needs CUDA (or TRITON_INTERPRET=1 on CPU)"
    # a dict kept as long as the calls: the first call builds the tables, the rest reuse them; None: every call
    calls = [Call("ksa-triton", "ksa", (lambda t=tables: ksa_op(batch.inputs, batch.offsets, s, tables=t)) if triton_ok
                  else None, batch.inputs, batch.grads, ksa_flops, setting=setting, unavailable=why)
             for setting, tables in (("block tables reused", {}), ("block tables built each call", None))]
    if batch.L <= reference_max_l:
        calls.append(Call("ksa torch reference", "ksa", lambda: ksa_op(batch.inputs, batch.offsets, s, backend="torch"),
                          batch.inputs, batch.grads, ksa_flops))
    return calls


def measure(call: Call, batch: Batch, args, ksa_flops: float) -> Row:
    """Forward, forward+backward and peak memory of one call; a refusal or failure becomes the status."""
    row = Row(batch.kind, batch.L, len(batch.lengths), call.name, call.group, call.setting,
              ksa_flops_fwd=ksa_flops, own_flops_fwd=call.own_flops_fwd)
    if call.unavailable:
        row.status = f"unavailable: {call.unavailable}"
        return row
    dev = batch.device

    def forward():  # a training forward: autograd records what the backward needs
        call.fn()

    def forward_backward():
        torch.autograd.backward(call.fn(), call.grads)

    timing = dict(device=dev, warmup_ms=args.warmup, rep_ms=args.rep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row.fwd_ms = kernel_ms(forward, **timing)
            if call.has_backward:
                row.fwd_bwd_ms = kernel_ms(forward_backward, grad_to_none=call.leaves, **timing)
                for leaf in call.leaves:
                    leaf.grad = None
                row.peak_mib = peak_mib(forward_backward, dev)
            else:
                row.status = "ok (forward only: no backward on this device)"
        except torch.OutOfMemoryError:
            row.status = "out of memory"
        except (RuntimeError, NotImplementedError) as err:
            reasons = [str(w.message).splitlines()[0] for w in caught if "not used because" in str(w.message)]
            refused = isinstance(err, NotImplementedError) or any(
                text in str(err) for text in ("No available kernel", "No viable backend"))
            row.status = (f"refused: {'; '.join(dict.fromkeys(reasons)) or _first_line(err)}" if refused
                          else f"failed: {type(err).__name__}: {_first_line(err)}")
        except Exception as err:  # noqa: BLE001 -- a compile or launch failure of one method must not end the run
            row.status = f"failed: {type(err).__name__}: {_first_line(err)}"
    for leaf in call.leaves:
        leaf.grad = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:160]


def precheck(batch: Batch, s: Setup, flex_default: Call, max_error: float) -> str:
    """KSA Triton vs the torch reference (fp32, head 0) and vs per-user Flex (all heads); raises above
    ``max_error`` (then every timing would be meaningless)."""
    with torch.no_grad():
        ref = ksa_op([t[:, :1].float() for t in batch.inputs], batch.offsets, s, backend="torch")
        triton_ok = batch.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        got = ksa_op(batch.inputs, batch.offsets, s) if triton_ok else None
    flex_out = None
    if flex_default.unavailable is None:  # with autograd on, as timed: the same compiled graph, no extra compile
        packed_out = flex_default.fn()[0].detach()
        flex_out = unpack_per_user(packed_out, PerUserLayout(tuple(batch.lengths), s.chunk, s.sums))

    def err(a, b):
        return max(((x.float() - y.float()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))

    errors = {}
    if flex_out is not None:
        errors["flex per-user vs torch ref (head 0)"] = err([f[:, :1] for f in flex_out], ref)
    if got is not None:
        errors["triton vs torch ref (head 0)"] = err([g[:, :1] for g in got], ref)
    if got is not None and flex_out is not None:
        errors["triton vs flex per-user (all heads)"] = err(got, flex_out)
    if not errors:
        return f"{batch.kind} L={batch.L}: nothing to compare (neither KSA Triton nor per-user Flex ran)"
    line = f"{batch.kind} L={batch.L}: " + ", ".join(f"max |{k}| = {v:.2e}" for k, v in errors.items())
    if max(errors.values()) > max_error:
        raise SystemExit(f"correctness pre-check failed, timings would be meaningless: {line}")
    return line


# ---- suites --------------------------------------------------------------------------------------------

def matmul_rate(args, s: Setup, device: torch.device) -> dict:
    """The dense matmul rate of this device in this run: n x n x n in the benchmark's dtype."""
    n = args.matmul_n
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=device, dtype=s.dtype) for _ in range(2))
    ms = kernel_ms(lambda: a @ b, device=device, warmup_ms=args.warmup, rep_ms=args.rep)
    return {"n": n, "dtype": str(s.dtype).replace("torch.", ""), "ms": ms, "tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12}


def attention_suite(args, s: Setup, report: Report, device: torch.device) -> None:
    """Every method on every (kind, L) batch."""
    settings = [t for t in TILE_SETTINGS if t.name in args.flex_tiles]

    def sweep(kind: str, L: int) -> bool:  # every tile setting, or the first (default) only
        return kind == "uniform" and L in args.flex_sweep_lengths
    for kind in args.kinds:
        for L in args.lengths:
            batch = make_batch(kind, L, args.total, s, device)
            flops = 4.0 * ksa_pairs(batch.lengths, s.chunk, s.window, s.sums) * s.dim * s.heads
            calls = [*dense_calls(batch.inputs[:3], batch.offsets, batch.lengths, batch.grads[0], batch.gen),
                     *flex_calls(batch, s, settings if sweep(kind, L) else settings[:1], flops),
                     *ksa_calls(batch, s, flops, args.reference_max_l)]
            flex_default = next(c for c in calls if c.group == "flex-ksa")
            report.checks.append(precheck(batch, s, flex_default, args.max_error))
            print(report.checks[-1], flush=True)
            for call in calls:
                report.rows.append(measure(call, batch, args, flops))
                print(format_row(report.rows[-1], report.matmul), flush=True)
            del batch, calls, flex_default
            save(report, s, args)


def sweep_suite(args, s: Setup, report: Report, device: torch.device) -> None:
    """KSA Triton tiles (forward, then backward; the default first), uniform batches."""
    base = default_config(s.dim, s.dtype)
    # (block_m, block_n, warps, stages)
    fwd_tiles = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 32, 4, 3), (64, 128, 4, 2), (64, 64, 4, 4)]
    # (dK/dV: keys, queries, warps, stages; dQ: queries, keys, warps, stages)
    bwd_tiles = [(64, 32, 4, 3, 64, 64, 4, 3), (128, 32, 8, 3, 128, 32, 8, 3), (64, 64, 4, 3, 64, 64, 4, 3),
                 (64, 32, 4, 3, 128, 32, 8, 3), (64, 32, 4, 4, 64, 64, 4, 4), (64, 32, 4, 3, 64, 32, 4, 3)]
    configs = [("fwd", f"block_m={bm} block_n={bn} warps={w} stages={st}",
                replace(base, block_m=bm, block_n=bn, fwd_warps=w, fwd_stages=st)) for bm, bn, w, st in fwd_tiles]
    configs += [("fwd+bwd", f"dkdv {kn}x{km} w{kw} s{ks}, dq {qm}x{qn} w{qw} s{qs}",
                 replace(base, dkdv_block_n=kn, dkdv_block_m=km, dkdv_warps=kw, dkdv_stages=ks, dq_block_m=qm,
                         dq_block_n=qn, dq_warps=qw, dq_stages=qs))
                for kn, km, kw, ks, qm, qn, qw, qs in bwd_tiles]
    for L in args.lengths:
        batch = make_batch("uniform", L, args.total, s, device)
        for which, name, cfg in configs:
            call = Call("ksa-triton", "ksa", lambda c=cfg, b=batch: ksa_op(b.inputs, b.offsets, s, config=c),
                        batch.inputs, batch.grads, 0.0)
            row = measure(call, batch, args, 0.0)
            report.sweep.append({"L": L, "pass": which, "config": name, "status": row.status,
                                 "ms": row.fwd_ms if which == "fwd" else row.fwd_bwd_ms})
            print(report.sweep[-1], flush=True)
        save(report, s, args)


# matmuls each Triton kernel runs per visible (query, key) tile pair: forward QK^T, PV; dK/dV: S^T,
# dV, dP^T, dK (+ dQ with atomics); dQ: S, dP, dQ. Used for the per-kernel rate on KSA-needed pairs.
KERNEL_MATMULS = {"ksa_fwd_kernel": 2, "ksa_bwd_dkdv_kernel": 4, "ksa_bwd_dq_kernel": 3}


def kernel_matmuls(kernel: str, deterministic: bool) -> int:
    """Matmuls per visible tile of ``kernel`` (0: no rate). With atomic dQ the dK/dV kernel adds dS K and the
    dQ kernel computes only the summary queries, which use no matmul: a rate on all pairs would be made up."""
    if not deterministic and kernel == "ksa_bwd_dq_kernel":
        return 0
    return KERNEL_MATMULS.get(kernel, 0) + (kernel == "ksa_bwd_dkdv_kernel" and not deterministic)


def stages_suite(args, s: Setup, report: Report, device: torch.device) -> None:
    """Where forward+backward time goes: per-kernel device time (torch.profiler) of the Triton op on
    uniform batches, deterministic vs atomic-dQ backward, without the summary stream (S = 0), and with
    the summary stream but no event reading it (M = 0: what the summary queries and keys cost alone)."""
    if device.type != "cuda":
        report.notes.append("stages suite: skipped (needs CUDA for the profiler's kernel times)")
        return
    from torch.profiler import ProfilerActivity, profile

    base = default_config(s.dim, s.dtype)
    iters = 10
    for L in args.lengths:
        batch = make_batch("uniform", L, args.total, s, device)
        q, k, v, qs, ks, vs = batch.inputs
        no_sum = [t[:0].detach().requires_grad_() for t in (qs, ks, vs)]
        variants = [("deterministic", base, s.sums, None, batch.inputs, batch.grads),
                    ("atomic-dQ", replace(base, deterministic=False), s.sums, None, batch.inputs, batch.grads),
                    ("S=0 (event band only)", base, 0, None, [q, k, v, *no_sum], [batch.grads[0], batch.grads[1][:0]]),
                    ("M=0 (band + summary stream, no event reads a summary)", base, s.sums, 0, batch.inputs,
                     batch.grads)]
        for name, cfg, sums, max_sum, inputs, grads in variants:
            pairs = ksa_pairs(batch.lengths, s.chunk, s.window, sums, max_sum)

            def step(inputs=inputs, offsets=batch.offsets, cfg=cfg, sums=sums, max_sum=max_sum, grads=grads):
                torch.autograd.backward(ksa_op(inputs, offsets, s, config=cfg, sums=sums, max_summaries=max_sum),
                                        grads)
                for leaf in inputs:
                    leaf.grad = None

            for _ in range(3):
                step()
            sync(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    step()
                sync(device)
            times: dict[str, float] = {}
            for evt in prof.key_averages():
                if evt.self_device_time_total > 0:
                    key = evt.key if evt.key.startswith("ksa_") else "other (torch glue: tables, sort, fills, casts)"
                    times[key] = times.get(key, 0.0) + evt.self_device_time_total / 1e3 / iters
            total = sum(times.values())
            for kernel, ms in [*sorted(times.items(), key=lambda kv: -kv[1]), ("total (device time)", total)]:
                mm = (FWD_BWD_FACTOR * 2 if kernel.startswith("total") else kernel_matmuls(kernel, cfg.deterministic))
                rate = 2 * mm * pairs * s.dim * s.heads / (ms * 1e-3) / 1e12 if mm else None
                report.stages.append({"L": L, "variant": name, "kernel": kernel, "ms": ms, "share": ms / total,
                                      "tflops": rate})
                print(report.stages[-1], flush=True)
        save(report, s, args)


SUITES = {"attention": attention_suite, "sweep": sweep_suite, "stages": stages_suite}


# ---- report --------------------------------------------------------------------------------------------

def fastest(rows: list[Row], group: str, attr: str) -> Row | None:
    timed = [r for r in rows if r.group == group and getattr(r, attr) is not None]
    return min(timed, key=lambda r: getattr(r, attr), default=None)


def ksa_triton(rows: list[Row], attr: str) -> Row | None:
    """The faster KSA Triton setup (block tables reused or built each call) among ``rows``."""
    return fastest([r for r in rows if r.method == "ksa-triton"], "ksa", attr)


def _speedup(baseline: Row | None, row: Row, attr: str) -> str:
    base, ms = (None if baseline is None else getattr(baseline, attr)), getattr(row, attr)
    return "-" if base is None or ms is None else f"{base / ms:.2f}x"


def _share(tflops: float | None, matmul: dict) -> str:
    return "-" if tflops is None or not matmul else f"{tflops / matmul['tflops']:.0%}"


def format_row(r: Row, matmul: dict) -> str:
    tf = r.tflops("fwd_bwd_ms", FWD_BWD_FACTOR)
    return (f"{r.kind:8s} L={r.L:6d} {r.label:58s} fwd {fmt(r.fwd_ms):>8s} ms  fwd+bwd {fmt(r.fwd_bwd_ms):>8s} ms  "
            f"{fmt(tf, 0):>5s} TFLOP/s ({_share(tf, matmul)} of matmul)  {'' if r.status == 'ok' else r.status}")


def summary_table(rows: list[Row], kind: str, matmul: dict, label: str, attr: str, factor: float) -> list[str]:
    """Per L: the fastest dense, the fastest Flex-KSA and KSA Triton, with the ratios naming their baselines."""
    lines = [f"| L | users | dense fastest ms (which) | Flex-KSA fastest ms (which) | KSA Triton ms | "
             f"KSA Triton speed-up vs dense fastest | vs Flex-KSA fastest | KSA Triton TFLOP/s (KSA-needed) | "
             f"share of {matmul.get('dtype')} matmul ({fmt(matmul.get('tflops'), 0)} TFLOP/s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for L in dict.fromkeys(r.L for r in rows if r.kind == kind):
        same = [r for r in rows if r.kind == kind and r.L == L]
        dense, flex_best = fastest(same, "dense", attr), fastest(same, "flex-ksa", attr)
        ksa = ksa_triton(same, attr)

        def cell(r: Row | None) -> str:
            return "-" if r is None else f"{fmt(getattr(r, attr))} ({r.label})"

        tf = None if ksa is None else ksa.tflops(attr, factor)
        lines.append(f"| {L} | {same[0].users} | {cell(dense)} | {cell(flex_best)} | "
                     f"{'-' if ksa is None else cell(ksa)} | "
                     f"{'-' if ksa is None else _speedup(dense, ksa, attr)} "
                     f"({'-' if dense is None else dense.label}) | "
                     f"{'-' if ksa is None else _speedup(flex_best, ksa, attr)} "
                     f"({'-' if flex_best is None else flex_best.label}) | {fmt(tf, 0)} | {_share(tf, matmul)} |")
    return [f"### {label}", "", *lines]


def full_table(rows: list[Row], kind: str, matmul: dict) -> list[str]:
    lines = ["| L | users | method | status | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd share of "
             "matmul | own fwd+bwd TFLOP/s (dense: causal work) | peak MiB (fwd+bwd) | fwd+bwd speed-up vs dense "
             "fastest | vs Flex-KSA fastest |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.kind == kind):
        same = [x for x in rows if x.kind == kind and x.L == r.L]
        dense, flex_best = fastest(same, "dense", "fwd_bwd_ms"), fastest(same, "flex-ksa", "fwd_bwd_ms")
        tf = r.tflops("fwd_bwd_ms", FWD_BWD_FACTOR)
        own = fmt(r.tflops("fwd_bwd_ms", FWD_BWD_FACTOR, own=True), 0) if r.group == "dense" else "-"
        lines.append(f"| {r.L} | {r.users} | {r.label} | {r.status} | {fmt(r.fwd_ms)} | {fmt(r.fwd_bwd_ms)} | "
                     f"{fmt(r.tflops('fwd_ms', 1.0), 0)} | {fmt(tf, 0)} | {_share(tf, matmul)} | {own} | "
                     f"{fmt(r.peak_mib, 0)} | {_speedup(dense, r, 'fwd_bwd_ms')} | "
                     f"{_speedup(flex_best, r, 'fwd_bwd_ms')} |")
    return lines


def goal_checks(rows: list[Row], matmul: dict) -> list[str]:
    """Issue 16's kernel goals, uniform batches, forward+backward, against this run's baselines."""
    out = []
    for L, vs_dense, vs_flex, share in ((1024, 1.0, None, None), (4096, 2.0, None, None), (16384, 4.0, 2.0, 0.35),
                                        (65536, 6.0, None, 0.45)):
        same = [r for r in rows if r.kind == "uniform" and r.L == L]
        ksa = ksa_triton(same, "fwd_bwd_ms")
        if ksa is None:
            continue
        checks = [("dense fastest", fastest(same, "dense", "fwd_bwd_ms"), vs_dense),
                  ("Flex-KSA fastest", fastest(same, "flex-ksa", "fwd_bwd_ms"), vs_flex)]
        for name, base, goal in checks:
            if base is not None and goal is not None:
                x = base.fwd_bwd_ms / ksa.fwd_bwd_ms
                out.append(f"- L={L}: KSA Triton ({ksa.setting}) {x:.2f}x {name} ({base.label}, "
                           f"{base.fwd_bwd_ms:.3f} ms); goal >= {goal}x: {'met' if x >= goal else 'NOT met'}")
        if share is not None and matmul:
            got = ksa.tflops("fwd_bwd_ms", FWD_BWD_FACTOR) / matmul["tflops"]
            out.append(f"- L={L}: KSA Triton ({ksa.setting}) at {got:.0%} of the bf16 matmul rate on KSA-needed "
                       f"FLOPs; goal >= {share:.0%}: {'met' if got >= share else 'NOT met'}")
    return out


def markdown(report: Report, s: Setup, args) -> str:
    mm = report.matmul
    lines = [*header("Attention kernels: KSA Triton vs dense causal attention vs Flex-KSA, one run", args.command,
                     args.machine, args.date),
             f"- setup: B*L = {args.total} events, H = {s.heads}, D = {s.dim}, k = {s.chunk}, W = {s.window}, "
             f"S = {s.sums}, {str(s.dtype).replace('torch.', '')}; "
             + (f"median of `triton.testing.do_bench` ({args.warmup} ms warm-up, {args.rep} ms repetitions)"
                if args.machine.get("capability") else "CPU smoke run: one wall-clock call per timing, the numbers "
                "only show that the code runs"),
             f"- dense matmul in this run: {mm.get('n')}^3 {mm.get('dtype')}, {fmt(mm.get('ms'))} ms, "
             f"{fmt(mm.get('tflops'), 0)} TFLOP/s",
             "- FLOPs: forward = 4 x (KSA-visible query-key pairs, both streams, exact) x D x H; backward = 2.5 x "
             "forward. TFLOP/s divide these KSA-needed FLOPs by each method's time; 'share of matmul' divides by "
             "the matmul rate above; dense rows also show their own rate on the causal work "
             "(2 x B x H x L_max^2 x D forward; varlen: 2 x H x D x sum n^2).",
             "- dense fastest: the fastest of SDPA (default choice, and cuDNN / flash / efficient forced), varlen "
             "flash and FlashAttention-4 where it imports. Flex-KSA fastest: the fastest Flex row (per-user setups "
             "of each tile setting, and the old packed setup). Speed-up = baseline ms / this ms.",
             "- Flex-KSA per-user: one batch row per user, arithmetic mask_mod, block mask built once, "
             "`torch.compile(flex_attention, dynamic=False)`; jagged batches are padded to their longest user. "
             f"Tile settings: the first ('{args.flex_tiles[0]}') everywhere, all of {args.flex_tiles} on uniform "
             f"batches at L = {args.flex_sweep_lengths}; the old packed setup on uniform batches. KSA Triton: "
             "`ksa_attention(backend='triton')` (deterministic backward, the default).",
             "- fwd: the forward of a training step (autograd on); fwd+bwd: forward and backward.",
             *[f"- {n}" for n in report.notes], ""]
    for kind in dict.fromkeys(r.kind for r in report.rows):
        lines += [f"## {kind} batches", ""]
        for label, attr, factor in PASSES:
            lines += [*summary_table(report.rows, kind, mm, label, attr, factor), ""]
        lines += ["### every row", "", *full_table(report.rows, kind, mm), ""]
    if report.rows:
        lines += ["## Goals of issue 16 (uniform, forward+backward, this run's baselines)", "",
                  *(goal_checks(report.rows, mm) or ["- (not measured in this run)"]), "",
                  "## Correctness pre-check", "", *[f"- {c}" for c in report.checks], ""]
    if report.sweep:
        lines += ["## KSA Triton tile sweep (uniform; ms)", "", "| L | pass | config | ms | status |",
                  "|---|---|---|---|---|",
                  *[f"| {r['L']} | {r['pass']} | {r['config']} | {fmt(r['ms'])} | {r['status']} |"
                    for r in report.sweep],
                  ""]
    if report.stages:
        lines += ["## Where KSA Triton's forward+backward time goes (torch.profiler, device ms per call)", "",
                  "TFLOP/s: each kernel's own matmuls on the KSA-needed pairs (forward 2; dK/dV 4, 5 with atomic dQ; "
                  "dQ 3); total: forward+backward KSA-needed FLOPs.", "",
                  "| L | variant | kernel | ms | share | TFLOP/s |", "|---|---|---|---|---|---|",
                  *[f"| {r['L']} | {r['variant']} | {r['kernel']} | {r['ms']:.3f} | {r['share']:.0%} | "
                    f"{fmt(r['tflops'], 0)} |" for r in report.stages], ""]
    return "\n".join(lines)


def save(report: Report, s: Setup, args) -> None:
    if args.out is None:
        return
    payload = {"command": args.command, "machine": args.machine, "date": args.date,
               "setup": {"total": args.total, "heads": s.heads, "dim": s.dim, "chunk": s.chunk, "window": s.window,
                         "summary_tokens": s.sums, "dtype": str(s.dtype).replace("torch.", ""),
                         "warmup_ms": args.warmup, "rep_ms": args.rep, "fwd_bwd_flop_factor": FWD_BWD_FACTOR},
               "matmul": report.matmul, "notes": report.notes, "checks": report.checks,
               "rows": [asdict(r) for r in report.rows], "sweep": report.sweep, "stages": report.stages}
    write_outputs(args.out, markdown(report, s, args), payload)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--kinds", nargs="+", choices=["uniform", "jagged"], default=["uniform", "jagged"])
    p.add_argument("--total", type=int, default=65536, help="events per batch (B * L)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--summary-tokens", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--flex-tiles", nargs="+", choices=[t.name for t in TILE_SETTINGS],
                   default=[t.name for t in TILE_SETTINGS], help="Flex tile settings of the sweep; the first is "
                   "timed at every batch")
    p.add_argument("--flex-sweep-lengths", type=int, nargs="*", default=[16384],
                   help="uniform L where every Flex tile setting is timed (each costs a compile of its own); "
                   "none: no sweep")
    p.add_argument("--reference-max-l", type=int, default=4096, help="longest L the torch reference is timed at")
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the n x n x n matmul that sets the rate")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench repetitions, ms")
    p.add_argument("--max-error", type=float, default=5e-2, help="pre-check threshold (bf16 outputs are O(1))")
    p.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=["attention"],
                   help="attention: the comparison; sweep: KSA Triton tiles; stages: per-kernel profile")
    p.add_argument("--quick", action="store_true",
                   help="smoke run at tiny sizes (CPU: fp32; set TRITON_INTERPRET=1 to include KSA Triton)")
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json (e.g. docs/results/raw/kernels-h200-DATE)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(lengths=[64, 128], total=256, heads=2, dim=16, window=2, warmup=5, rep=20, matmul_n=256,
                       reference_max_l=128, flex_sweep_lengths=[64], dtype="bf16" if device.type == "cuda" else "fp32")
        args = p.parse_args(argv)
    args.command, args.machine, args.date = command(__file__, argv), machine(device), now()
    s = Setup(args.heads, args.dim, args.chunk, args.window, args.summary_tokens, DTYPES[args.dtype])
    report = Report(matmul=matmul_rate(args, s, device))
    print(f"matmul {report.matmul['n']}^3: {report.matmul['tflops']:.0f} TFLOP/s", flush=True)
    for name in dict.fromkeys(args.suites):
        SUITES[name](args, s, report, device)
    save(report, s, args)
    text = markdown(report, s, args)
    print(text if args.out is None else f"report: {args.out}.md, rows: {args.out}.json")


if __name__ == "__main__":
    main()
