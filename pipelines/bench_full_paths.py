"""Which kernel should run the ``full`` layer of a summary-free pattern: the paths of
``ksa_rec.ops.causal`` on real training batches, forward+backward, in one run.

How to run (repository root)::

    # GPU machine: batches of ML-1M users (SASRec's file), cut at 200 events and whole, fp32 and bf16
    python pipelines/bench_full_paths.py --data ../shared/data/ml-1m/ml-1m.txt --out docs/results/raw/full-paths-DATE
    # CPU smoke run (seconds): the CPU paths only
    python pipelines/bench_full_paths.py --data ../shared/data/ml-100k/u.data --dim 16 --batches 1 --out /tmp/fp

Batches: ``--batches`` random batches of ``--batch`` users (seeded, as the training sampler draws them),
each user's training events (all but the last two, the protocol's held-out targets) cut to their last
``--max-len`` events (0 = whole); and uniform batches of ``--batch`` users of each ``--uniform`` length.
Heads and dim are the model's (``--dim`` / ``--heads``: ML-1M's shipped config is 128 / 4, head dim 32).

Paths (``resolve_full_path`` picks one per batch; this script times each that can run here): ``padded``
(right-pad to the longest user, SDPA, its own backend choice), ``varlen`` (FlashAttention varlen, CUDA
fp16/bf16), ``ksa`` (the KSA op's full rule on its auto backend: Triton on CUDA), ``dense`` (uniform
batches only: SDPA on a view). Each row gives the median ms (``triton.testing.do_bench`` on CUDA) of
forward+backward summed over the batches, the rule's pick, and ms / the padded path's ms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import command, fmt, header, kernel_ms, machine, now, write_outputs  # noqa: E402

from ksa_rec.data.readers import read_interactions  # noqa: E402
from ksa_rec.ops.backend import FULL_PATHS, resolve_full_path  # noqa: E402
from ksa_rec.ops.causal import causal_attention  # noqa: E402
from ksa_rec.utils.jagged import lengths_to_offsets  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def user_lengths(path: Path) -> list[int]:
    """Training events per user of a log (every event but the last two: validation and test)."""
    log = read_interactions(path)
    counts = log.group_by("user_id").len()["len"].to_list()
    return [n - 2 for n in counts if n > 2]


def batches(lengths: list[int], batch: int, count: int, max_len: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    cut = (lambda n: min(n, max_len)) if max_len else (lambda n: n)
    return [[cut(lengths[i]) for i in order[j * batch:(j + 1) * batch]] for j in range(count)]


def time_path(path: str, sizes: list[list[int]], heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> float | str:
    """Median fwd+bwd ms of ``path`` summed over the batches, or why it cannot run."""
    if path == "dense" and any(len(set(lengths)) > 1 for lengths in sizes):
        return "jagged batches"
    total = 0.0
    for lengths in sizes:
        try:
            total += _time_batch(path, lengths, heads, head_dim, dtype, device)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            return f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"
    return total


def _time_batch(path: str, lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    rows = sum(lengths)
    q, k, v = (torch.randn(rows, heads, head_dim, generator=gen, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    grad = torch.randn(rows, heads, head_dim, generator=gen, device=device, dtype=dtype)
    offsets = lengths_to_offsets(torch.tensor(lengths)).to(device)

    def step():
        causal_attention(q, k, v, offsets, max_len=max(lengths), check_offsets=False, path=path).backward(grad)

    step()  # fails here, untimed, where the path cannot run
    return kernel_ms(step, device=device, warmup_ms=25, rep_ms=100, grad_to_none=[q, k, v])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--max-len", type=int, nargs="+", default=[200, 0], help="0 = whole histories")
    p.add_argument("--uniform", type=int, nargs="*", default=[200, 1024])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="prefix of the .md and .json written")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # what training sets (float32 matmul precision "high")
    head_dim = args.dim // args.heads
    lengths = user_lengths(args.data)
    cases = [(f"{args.data.name}, {'whole' if m == 0 else f'last {m}'}", batches(lengths, args.batch, args.batches,
                                                                                   m, args.seed))
             for m in args.max_len]
    cases += [(f"uniform {n}", [[n] * args.batch] * args.batches) for n in args.uniform]
    info, date, cmd = machine(device), now(), command(__file__, argv)
    rows = []
    for name, sizes in cases:
        flat = [n for s in sizes for n in s]
        waste = sum(len(s) * max(s) for s in sizes) / sum(flat)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            picks = {resolve_full_path(device, dtype, sum(s), len(s), max(s), head_dim, True) for s in sizes}
            times = {path: time_path(path, sizes, args.heads, head_dim, dtype, device) for path in FULL_PATHS}
            rows.append({"batches": name, "dtype": dtype_name, "events": sum(flat), "padded_over_real": waste,
                         "rule_picks": sorted(picks), "ms": times})
            print(name, dtype_name, times, flush=True)
    lines = header("Full causal attention: the paths of ksa_rec.ops.causal, forward+backward", cmd, info, date)
    lines += ["", f"{args.batches} batches of {args.batch} users, dim {args.dim}, {args.heads} heads (head dim "
              f"{head_dim}); ms = median fwd+bwd summed over the batches; (x) = ms / padded ms.", "",
              "| batches | dtype | events | padded / real events | rule picks | "
              + " | ".join(FULL_PATHS) + " |", "|" + "---|" * (5 + len(FULL_PATHS))]
    for row in rows:
        base = row["ms"]["padded"]
        cells = [(f"{fmt(ms)} ({ms / base:.2f}x)" if isinstance(base, float) else fmt(ms))
                 if isinstance(ms, float) else f"- ({ms})" for ms in row["ms"].values()]
        lines.append(f"| {row['batches']} | {row['dtype']} | {row['events']:,} | {row['padded_over_real']:.2f} | "
                     f"{', '.join(row['rule_picks'])} | " + " | ".join(cells) + " |")
    md, js = write_outputs(args.out, "\n".join(lines) + "\n",
                           {"command": cmd, "machine": info, "date": date, "rows": rows})
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
