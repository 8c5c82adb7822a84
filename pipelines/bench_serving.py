"""Streaming-state benchmark: state updates per second, batch-1 latency and state bytes per user.

How to run (repository root):

    python pipelines/bench_serving.py --out docs/results/serving.md            # CPU here, or the GPU if present
    python pipelines/bench_serving.py --histories 1000 10000 --batch 64 --quick

For each model (hybrid-KSA ``ksa*3,full``, all-KSA ``ksa*4``, full ``full*4``, and the MKA hybrids
``mka*3,full`` / ``fastmka*3,full`` with MKA.md's defaults; dim 64, 4 heads, k = 8, W = 32 chunks, S = 1)
and history length n, each user's per-layer cache holds exactly what the streaming state keeps after n
events (KSA.md section 7: the ring of the open chunk + W chunks and all n // k summaries for ksa layers;
all n events for full layers; the fixed-size memories of mka/fastmka layers), filled with random values
(speed does not depend on them). Timed: one ``SequenceEncoder.step`` (embedding lookup included) that appends one new
event per user, for a batch of users (updates/s = users / time) and for one user (latency); the median
of repeated runs after warm-up. State bytes per user = the cache tensors (float32 K/V + int64 indices)
versus a full KV cache (2 * n * dim * layers floats).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor

from ksa_rec.data.schema import DataSpec
from ksa_rec.models.seqrec import SeqRecModel
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.losses import LossConfig
from ksa_rec.utils.jagged import lengths_to_offsets

MODELS = {"hybrid-KSA": "ksa*3,full", "all-KSA": "ksa*4", "full": "full*4", "hybrid-MKA": "mka*3,full",
          "hybrid-FastMKA": "fastmka*3,full"}


def user_cache(block, kind: str, n: int, cfg: EncoderConfig, device, dtype) -> dict[str, torch.Tensor]:
    """The rows one user's layer keeps after ``n`` events (random values; memory layers: their fixed
    buffers, sized by the config alone)."""
    k, W, H, Dh = cfg.chunk_size, cfg.window, cfg.num_heads, cfg.dim // cfg.num_heads
    if kind in ("mka", "fastmka"):
        return block.attn.empty_cache(1, dtype, device).user(0)
    if kind == "full":
        idx, sidx = torch.arange(n), torch.zeros(0, dtype=torch.long)
    else:
        idx = torch.arange(max(0, (n // k - W) * k), n)
        sidx = torch.arange(n // k)
    rows = lambda m: torch.randn(m, H, Dh, dtype=dtype, device=device)  # noqa: E731
    return {"k": rows(len(idx)), "v": rows(len(idx)), "idx": idx.to(device), "sk": rows(len(sidx)),
            "sv": rows(len(sidx)), "sidx": sidx.to(device)}


def bench(pattern: str, n: int, users: int, repeats: int, device, dtype=torch.float32) -> tuple[float, int]:
    cfg = EncoderConfig(dim=64, num_heads=4, pattern=pattern, dropout=0.0, chunk_size=8, window=32)
    model = SeqRecModel(cfg, LossConfig(), DataSpec(num_items=10_000)).to(device).eval()
    one = [user_cache(block, kind, n, cfg, device, dtype) for block, kind in zip(model.encoder.blocks, cfg.layers)]
    caches = model.encoder.stack_states([one] * users)
    state_bytes = sum(t.numel() * t.element_size() for layer in one for t in layer.values())
    ones = torch.ones(users, dtype=torch.long)
    features = KeyedJaggedTensor(keys=["item_id"], values=torch.randint(2, 10_000, (users,)), lengths=ones,
                                 offsets=lengths_to_offsets(ones)).to(device)
    offsets, count = lengths_to_offsets(ones).to(device), torch.full((users,), n, device=device)

    def step():
        tokens, time_part = model.embedding(features)
        model.encoder.step(tokens, offsets, count, time_part, caches)
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(3):
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times), state_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--batch", type=int, default=256, help="users per update for the throughput column")
    p.add_argument("--max-batch-history", type=int, default=10_000,
                   help="longest history timed with the full batch (longer: batch-1 only, for memory)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = 3 if args.quick else args.repeats
    rows = []
    for n in args.histories:
        for name, pattern in MODELS.items():
            latency, state_bytes = bench(pattern, n, 1, repeats, device)
            throughput = None
            if n <= args.max_batch_history:
                batch_time, _ = bench(pattern, n, args.batch, repeats, device)
                throughput = args.batch / batch_time
            full_kv = 2 * n * 64 * 4 * 4
            rows.append((n, name, latency, throughput, state_bytes, full_kv))
            print(f"n={n:>7} {name:<10} latency {latency * 1e3:8.2f} ms  "
                  f"updates/s {throughput or float('nan'):10.0f}  state {state_bytes / 1e6:8.2f} MB "
                  f"(full KV {full_kv / 1e6:.2f} MB)", flush=True)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [f"# Streaming state updates: {machine}", "",
             f"Date: {datetime.date.today()}. Command: `python pipelines/bench_serving.py "
             f"--histories {' '.join(map(str, args.histories))} --batch {args.batch}"
             f"{' --quick' if args.quick else ''}`. torch {torch.__version__}, float32.", "",
             "One update = one new event per user through embedding + all layers (``SequenceEncoder.step``), "
             "caches sized as a real state after n events (dim 64, 4 heads, 4 layers, k = 8, W = 32, S = 1).", "",
             f"| history n | model | batch-1 latency ms | updates/s (batch {args.batch}) | state bytes/user | "
             "full KV cache bytes | full KV / state |", "|---|---|---|---|---|---|---|"]
    for n, name, latency, throughput, state_bytes, full_kv in rows:
        tput = f"{throughput:,.0f}" if throughput else "- (memory)"
        lines.append(f"| {n:,} | {name} | {latency * 1e3:.2f} | {tput} | {state_bytes:,} | {full_kv:,} | "
                     f"{full_kv / state_bytes:.1f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        rows_json = [dict(history=n, model=name, latency_ms=latency * 1e3, updates_per_s=throughput,
                          state_bytes=state_bytes, full_kv_bytes=full_kv, machine=machine)
                     for n, name, latency, throughput, state_bytes, full_kv in rows]
        args.out.with_suffix(".json").write_text(json.dumps(rows_json, indent=2))


if __name__ == "__main__":
    main()
