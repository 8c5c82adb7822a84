"""Decode (serving step) benchmark of the cached KSA op: the Triton kernel (``triton_cached.py``) vs the
torch path of ``ksa_cached_attention``, as achieved memory bandwidth against a device-to-device copy
measured in the same run (protocol: ../shared/design/BENCHMARKS.md section 4, streaming).

How to run (GPU machine, repository root)::

    python pipelines/bench_decode.py                          # histories 1K, 10K, 100K; 1,024 users
    python pipelines/bench_decode.py --histories 10000 --sweep  # also time alternative launch configs
    python pipelines/bench_decode.py --quick                  # smoke run

One step: every user gets one new event (index n_b, histories n_b = n + b % 7 so that users sit at
different chunk phases and no new event completes a chunk: one event query per user). k = 8, W = 32,
S = 1, H = 8, D = 64, bf16. The cache of a user is what a KSA state keeps (KSA.md section 7): the ring
of the last (W+1)*k events, stored in ring order (rotated, as a ring buffer holds them), the new event
included, plus all n_b // k summaries. The same users under full attention (``window=None``) keep all
n_b + 1 events; the same kernel serves both, so the comparison isolates the state size. Where a full
cache of all users would not fit in ``--full-budget-gb``, the full rows use the first users that fit
(and the KSA row is repeated for that subset).

Bytes per call: K and V of every cached key, read once (the floor a decode step must move); the key
indices (8 bytes per key, ~3% more) and queries/outputs are not counted. Bandwidth = bytes / median
time (``triton.testing.do_bench``); "of copy" divides by ``y.copy_(x)`` bandwidth of a few GB (bytes
read + written) measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import command, header, kernel_ms, machine, now, write_outputs  # noqa: E402

from ksa_rec.ops.ksa import KsaRule  # noqa: E402
from ksa_rec.ops.ksa.cached import KeyRows, QueryRows, ksa_cached_attention  # noqa: E402
from ksa_rec.ops.ksa.triton_cached import CachedTritonConfig, ksa_cached_attention_triton, plan_launch  # noqa: E402
from ksa_rec.utils.jagged import lengths_to_offsets  # noqa: E402


@dataclass
class Step:
    """One decode step of a batch of users; ``args``/``kwargs`` of ``ksa_cached_attention``."""

    name: str
    users: int
    keys: int  # cached keys, both streams
    args: tuple
    kwargs: dict

    @property
    def kv_bytes(self) -> int:
        k = self.args[4]
        return 2 * self.keys * k.shape[1] * k.shape[2] * k.element_size()

    def prefix(self, users: int) -> "Step":
        """The first ``users`` users of the batch (all streams are user-major)."""
        q, qo, qi, qs, k, v, ko, ki, ks, vs, so, si = self.args
        a, b, c = int(qo[users]), int(ko[users]), int(so[users])
        args = (q[:a], qo[:users + 1], qi[:a], qs[:a], k[:b], v[:b], ko[:users + 1], ki[:b], ks[:c], vs[:c],
                so[:users + 1], si[:c])
        return Step(self.name, users, b + c, args, self.kwargs)


def op_args(args: tuple, kwargs: dict) -> tuple:
    """A step's flat tensors and rule keywords as the cached op's arguments."""
    q, qo, qi, qs, k, v, ko, ki, ks, vs, so, si = args
    return q, QueryRows(qo, qi, qs), KeyRows(ko, ki, k, v), KeyRows(so, si, ks, vs), KsaRule(**kwargs)


def _jagged_arange(lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(n_b)`` over users, int64."""
    offsets = lengths_to_offsets(lengths)
    total = int(offsets[-1])
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total)
    return torch.arange(total, device=lengths.device) - offsets[seg]


def make_step(history: int, users: int, *, full: bool, k: int, W: int, S: int, H: int, Hkv: int, D: int,
              dtype: torch.dtype, seed: int = 0, dev: str = "cuda") -> Step:
    """The decode step described in the module docstring (random q/K/V; indices as a state holds them)."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    new = history + torch.arange(users, device=dev) % 7  # index of each user's new event
    ring = (W + 1) * k
    if full:
        ev_len = new + 1
        k_index = _jagged_arange(ev_len)
        s_len = torch.zeros_like(new)
    else:
        ev_len = torch.clamp(new + 1, max=ring)
        first = new + 1 - ev_len
        slot = _jagged_arange(ev_len)
        idx = torch.repeat_interleave(first, ev_len) + slot
        # ring order: slot idx % ring holds event idx, so the physical order starts mid-history
        key = torch.repeat_interleave(torch.arange(users, device=dev), ev_len) * ring + idx % ring
        k_index = idx[torch.argsort(key)]
        s_len = S * ((new + 1) // k)
    s_index = _jagged_arange(s_len)
    n_ev, n_sum = int(ev_len.sum()), int(s_len.sum())

    def rand(rows, heads):
        return torch.randn(rows, heads, D, generator=gen, device=dev, dtype=dtype)

    ones = torch.ones(users, dtype=torch.int64, device=dev)
    args = (rand(users, H), lengths_to_offsets(ones), new, torch.zeros(users, dtype=torch.bool, device=dev),
            rand(n_ev, Hkv), rand(n_ev, Hkv), lengths_to_offsets(ev_len), k_index,
            rand(n_sum, Hkv), rand(n_sum, Hkv), lengths_to_offsets(s_len), s_index)
    kwargs = dict(chunk_size=k, window=None if full else W, summary_tokens=S)
    return Step("full" if full else "ksa-state", users, n_ev + n_sum, args, kwargs)


def time_ms(fn, warmup: int, rep: int) -> float:
    return kernel_ms(fn, device=torch.device("cuda"), warmup_ms=warmup, rep_ms=rep)


def copy_bandwidth(gib: float, warmup: int, rep: int) -> float:
    """GB/s of a device-to-device copy of ``gib`` GiB, bytes read + written."""
    x = torch.randn(int(gib * 2**30) // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = time_ms(functools.partial(y.copy_, x), warmup, rep)
    nbytes = 2 * x.numel() * x.element_size()
    del x, y
    torch.cuda.empty_cache()
    return nbytes / (ms * 1e-3) / 1e9


def graphed(fn):
    """``fn`` captured once into a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def triton_fn(step: Step, config: CachedTritonConfig | None = None):
    return lambda: ksa_cached_attention_triton(*op_args(step.args, step.kwargs), config=config)


def torch_fn(step: Step):
    return lambda: ksa_cached_attention(*op_args(step.args, step.kwargs), backend="torch")


@torch.no_grad()
def precheck(step: Step, max_error: float) -> str:
    """Triton (bf16) vs the torch path in fp32 on the first 32 users; raises above max_error."""
    sub = step.prefix(min(32, step.users))
    got = triton_fn(sub)()
    up = [a.float() if a.is_floating_point() else a for a in sub.args]
    want = ksa_cached_attention(*op_args(tuple(up), sub.kwargs), backend="torch")
    err = (got.float() - want).abs().max().item()
    line = f"{step.name} history {int(step.args[2][0])}: max |triton bf16 - torch fp32| = {err:.2e} (32 users)"
    if not err <= max_error:
        raise SystemExit(f"correctness pre-check failed, timings would be meaningless: {line}")
    return line


@dataclass
class Row:
    history: int
    cache: str
    users: int
    method: str
    keys_per_user: float
    gb: float
    ms: float | None
    note: str = ""

    def bandwidth(self) -> float | None:
        return None if self.ms is None else self.gb / (self.ms * 1e-3)


def measure(step: Step, method: str, fn, history: int, args) -> Row:
    row = Row(history, step.name, step.users, method, step.keys / step.users, step.kv_bytes / 1e9, None)
    try:
        fn()  # compile / warm up outside the timing
        row.ms = time_ms(fn, args.warmup, args.rep)
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
    torch.cuda.empty_cache()
    print(format_row(row, None), flush=True)
    return row


def format_row(r: Row, copy_gbs: float | None) -> str:
    bw = r.bandwidth()
    share = "" if bw is None or copy_gbs is None else f" ({bw / copy_gbs:.0%} of copy)"
    ms = "-" if r.ms is None else f"{r.ms:.3f}"
    gbs = "-" if bw is None else f"{bw:.0f}"
    return (f"history {r.history:7d} {r.cache:9s} users {r.users:5d} {r.method:24s} keys/user {r.keys_per_user:9.0f} "
            f"{r.gb:7.2f} GB  {ms:>8s} ms  {gbs:>5s} GB/s{share} {r.note}")


def run(args) -> tuple[list[Row], list[str], list[str], float]:
    shape = dict(k=args.chunk, W=args.window, S=args.summary_tokens, H=args.heads, Hkv=args.kv_heads, D=args.dim,
                 dtype=torch.bfloat16)
    copy_gbs = copy_bandwidth(args.copy_gib, args.warmup, args.rep)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows, checks, sweep = [], [], []
    for history in args.histories:
        per_user_full = 2 * (history + 8) * args.kv_heads * args.dim * 2
        full_users = min(args.users, int(args.full_budget_gb * 1e9 // per_user_full) // 8 * 8)
        ksa = make_step(history, args.users, full=False, **shape)
        checks.append(precheck(ksa, args.max_error))
        print(checks[-1], flush=True)
        rows.append(measure(ksa, "triton", triton_fn(ksa), history, args))
        rows.append(measure(ksa, "torch", torch_fn(ksa), history, args))
        if rows[-1].ms is None and args.users > 64:  # the torch path pads and concatenates: try fewer users
            sub = ksa.prefix(args.users // 8)
            rows.append(measure(sub, "triton", triton_fn(sub), history, args))
            rows.append(measure(sub, "torch", torch_fn(sub), history, args))
        if args.sweep:
            for bn, warps, stages in args.sweep_configs:
                cfg = CachedTritonConfig(block_n=bn, num_warps=warps, num_stages=stages)
                ms = time_ms(triton_fn(ksa, cfg), args.warmup, args.rep)
                sweep.append(f"| {history} | block_n={bn} warps={warps} stages={stages} | {ms:.3f} | "
                             f"{ksa.kv_bytes / 1e9 / (ms * 1e-3):.0f} |")
                print(sweep[-1], flush=True)
        if full_users < args.users and full_users >= 8:
            sub = ksa.prefix(full_users)
            rows.append(measure(sub, "triton", triton_fn(sub), history, args))
        del ksa
        torch.cuda.empty_cache()
        if full_users >= 8:
            full = make_step(history, full_users, full=True, **shape)
            checks.append(precheck(full, args.max_error))
            rows.append(measure(full, "triton", triton_fn(full), history, args))
            rows.append(measure(full, "torch", torch_fn(full), history, args))
            del full
            torch.cuda.empty_cache()
        # batch-1 latency: one user, the key axis split across the GPU (flash-decoding); eagerly (host
        # launch overhead included) and replayed from a CUDA graph (the op never syncs, so it captures)
        for full_cache in (False, True):
            one = make_step(history, 1, full=full_cache, **shape)
            _, _, splits = plan_launch(1, args.kv_heads, args.heads // args.kv_heads, 1, one.keys, args.dim,
                                       torch.bfloat16, torch.device("cuda"), CachedTritonConfig())
            rows.append(measure(one, f"triton ({splits} splits)", triton_fn(one), history, args))
            rows.append(measure(one, f"triton ({splits} splits, CUDA graph)", graphed(triton_fn(one)), history,
                                args))
            rows.append(measure(one, "torch", torch_fn(one), history, args))
        write_report(rows, checks, sweep, copy_gbs, args)  # after every history: a timeout keeps the rest
    return rows, checks, sweep, copy_gbs


def table(rows: list[Row], copy_gbs: float) -> list[str]:
    lines = ["| history | cache | users | method | keys / user | K+V GB / call | ms / call | GB/s | of copy BW | "
             "speed-up vs torch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        torch_row = next((x for x in rows if x.history == r.history and x.cache == r.cache and x.users == r.users
                          and x.method == "torch"), None)
        speed = "-" if r.ms is None or torch_row is None or torch_row.ms is None or r.method == "torch" \
            else f"{torch_row.ms / r.ms:.1f}x"
        bw = r.bandwidth()
        lines.append(f"| {r.history} | {r.cache} | {r.users} | {r.method}{' (' + r.note + ')' if r.note else ''} | "
                     f"{r.keys_per_user:.0f} | {r.gb:.3f} | {'-' if r.ms is None else f'{r.ms:.3f}'} | "
                     f"{'-' if bw is None else f'{bw:.0f}'} | {'-' if bw is None else f'{bw / copy_gbs:.0%}'} | "
                     f"{speed} |")
    return lines


def goal_checks(rows: list[Row], copy_gbs: float, users: int) -> list[str]:
    """Bandwidth at the full batch; speed-up at the largest batch where the torch path ran too."""
    out = []
    for history in dict.fromkeys(r.history for r in rows):
        ksa = [r for r in rows if r.history == history and r.cache == "ksa-state" and r.ms is not None]
        main = next((r for r in ksa if r.method == "triton" and r.users == users), None)
        if main:
            share = main.bandwidth() / copy_gbs
            out.append(f"- history {history}, {users} users: {share:.0%} of copy bandwidth (goal >= 50%): "
                       f"{'met' if share >= 0.5 else 'NOT met'}")
        pairs = [(t, r) for t in ksa if t.method == "torch" and t.users > 1
                 for r in ksa if r.method == "triton" and r.users == t.users]
        if pairs:
            t, r = max(pairs, key=lambda pair: pair[0].users)
            x = t.ms / r.ms
            out.append(f"- history {history}, {t.users} users: {x:.1f}x the torch path (goal >= 3x): "
                       f"{'met' if x >= 3 else 'NOT met'}")
    return out


def write_report(rows, checks, sweep, copy_gbs, args) -> Path:
    lines = [
        *header("Decode step: cached KSA, Triton kernel vs torch path", args.command, args.machine, args.date),
        f"- setup: 1 new event per user, k = {args.chunk}, W = {args.window}, S = {args.summary_tokens}, "
        f"H = {args.heads}, Hkv = {args.kv_heads}, D = {args.dim}, bf16; median of triton.testing.do_bench",
        f"- device-to-device copy bandwidth (read + write, {args.copy_gib} GiB): {copy_gbs:.0f} GB/s",
        "- bytes: K and V of every cached key, read once; GB/s = those bytes / time",
        "",
        "## Results",
        "",
        *table(rows, copy_gbs),
        "",
        "## Goals",
        "",
        *(goal_checks(rows, copy_gbs, args.users) or ["- (not measured in this run)"]),
        "",
        "## Correctness pre-check",
        "",
        *[f"- {c}" for c in checks],
    ]
    if sweep:
        lines += ["", "## Launch-config sweep (KSA state, all users)", "", "| history | config | ms | GB/s |",
                  "|---|---|---|---|", *sweep]
    payload = {"command": args.command, "machine": args.machine, "date": args.date, "copy_gbs": copy_gbs,
               "rows": [asdict(r) for r in rows], "checks": checks, "sweep": sweep}
    md, _ = write_outputs(args.out / "decode", "\n".join(lines) + "\n", payload)
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--users", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--summary-tokens", type=int, default=1)
    p.add_argument("--full-budget-gb", type=float, default=24.0, help="largest full-attention cache to build")
    p.add_argument("--copy-gib", type=float, default=4.0)
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--max-error", type=float, default=5e-2)
    p.add_argument("--sweep", action="store_true", help="also time alternative (block_n, warps, stages)")
    p.add_argument("--quick", action="store_true", help="smoke run: history 1K and 10K, 64 users")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA device")
    if args.quick:
        args.histories, args.users, args.warmup, args.rep, args.copy_gib = [1000, 10_000], 64, 5, 20, 1.0
    args.command, args.machine, args.date = command(__file__, argv), machine(torch.device("cuda")), now()
    args.sweep_configs = [(128, 4, 2), (128, 4, 3), (128, 4, 4), (64, 4, 2), (64, 4, 3), (128, 8, 2)]
    rows, checks, sweep, copy_gbs = run(args)
    print("\n".join(["", f"copy bandwidth {copy_gbs:.0f} GB/s", *table(rows, copy_gbs), "",
                     *goal_checks(rows, copy_gbs, args.users), f"report: {args.out / 'decode.md'}"]))


if __name__ == "__main__":
    main()
