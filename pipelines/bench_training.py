"""Training throughput per attention kind and history length: events/s of a whole training step.

How to run (repository root):

    python pipelines/bench_training.py --out docs/results/raw/training-h100    # GPU: L = 1K, 4K, 16K, 64K
    python pipelines/bench_training.py --quick                                  # CPU smoke run, seconds

Every model has the same size (dim 64, 4 heads, 4 layers) and sees the same raw span of recent events:
KSA / SCA windows of W = 32 chunks of k = 8, SWA W*k = 256 events, MKA / FastMKA local windows of 256
events with blocks of 8 (MKA.md's other defaults). One step = embedding lookup, encoder forward,
sampled-softmax loss (1,024 uniform negatives, no in-batch ones: those cost tokens^2 and would
hide the attention, over a 100K-item table), backward and AdamW,
on a batch of ``--tokens`` events split into users of L events each (so every L does the same number of
next-item predictions); bf16 autocast on CUDA, float32 on CPU. Timed: the median of ``--steps`` steps
after ``--warmup``; peak memory is ``torch.cuda.max_memory_allocated``. A model that runs out of memory
is reported as such. Prints a markdown table; ``--out DIR`` also writes ``training.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ksa_rec.data.batch import random_training_batch
from ksa_rec.data.schema import DataSpec
from ksa_rec.models.seqrec import SeqRecModel
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.losses import LossConfig
from ksa_rec.modules.mka import MkaConfig

MODELS = {"full": "full*4", "hybrid-KSA": "ksa*3,full", "all-KSA": "ksa*4", "SCA": "sca*4", "SWA": "swa*4",
          "hybrid-MKA": "mka*3,full", "hybrid-FastMKA": "fastmka*3,full"}
CHUNK, WINDOW = 8, 32


def model_config(pattern: str) -> EncoderConfig:
    span = CHUNK * WINDOW
    return EncoderConfig(dim=64, num_heads=4, pattern=pattern, dropout=0.0, chunk_size=CHUNK, window=WINDOW,
                         mka=MkaConfig(local_window=span, fast_window=span, block_size=CHUNK))


def bench(pattern: str, length: int, tokens: int, warmup: int, steps: int, device: torch.device) -> dict:
    """One (model, L) measurement: median step seconds, events/s and peak GPU memory."""
    torch.manual_seed(0)
    model = SeqRecModel(model_config(pattern), LossConfig(kind="sampled", num_uniform_negatives=1024, in_batch_negatives=False),
                        DataSpec(num_items=100_000)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = random_training_batch(max(1, tokens // length), length, 100_000,
                                  torch.Generator().manual_seed(1)).to(device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    events = batch.offsets[-1].item()
    return {"step_ms": 1e3 * seconds, "events_per_s": events / seconds,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--tokens", type=int, default=65_536, help="events per step")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: L = 256, 512, 2,048 events per step")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.tokens, args.warmup, args.steps = [256, 512], 2048, 1, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for length in args.lengths:
        for name in args.models:
            try:
                row = bench(MODELS[name], length, args.tokens, args.warmup, args.steps, device)
            except torch.OutOfMemoryError:
                row = {"step_ms": None, "events_per_s": None, "peak_gb": None, "oom": True}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append({"model": name, "pattern": MODELS[name], "length": length, **row})
            print(json.dumps(rows[-1]), flush=True)
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    command = "python pipelines/bench_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = markdown(rows, machine, command, args.tokens)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "training.md").write_text(report)
        (args.out / "training.json").write_text(json.dumps({"machine": machine, "tokens": args.tokens,
                                                            "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


def markdown(rows: list[dict], machine: str, command: str, tokens: int) -> str:
    base = {r["length"]: r["events_per_s"] for r in rows if r["model"] == "full" and r["events_per_s"]}
    lines = [f"# Training throughput: {machine} ({datetime.date.today()})", "", f"`{command}`", "",
             f"{tokens:,} events per step; dim 64, 4 heads, 4 layers; k = {CHUNK}, W = {WINDOW} chunks "
             f"(span {CHUNK * WINDOW} events for every bounded kind); torch {torch.__version__}.", "",
             "| L (events per user) | model | step ms | events/s | vs full | peak GPU GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['length']:,} | {r['model']} | out of memory | - | - | - |")
            continue
        ratio = f"{r['events_per_s'] / base[r['length']]:.2f}x" if r["length"] in base else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        lines.append(f"| {r['length']:,} | {r['model']} | {r['step_ms']:.1f} | {r['events_per_s']:,.0f} | "
                     f"{ratio} | {peak} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
