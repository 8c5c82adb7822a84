"""Sharded-training throughput: events/s of the training step with a TorchRec-sharded item table, 1 vs N
processes (one per GPU), the dense encoder under DDP. See docs/distributed.md.

How to run (repository root)::

    # GPU machine with the CUDA build of fbgemm-gpu (the CPU build lacks the CUDA kernels TorchRec needs):
    python pipelines/bench_sharded.py --nproc 1 2 --out docs/results          # 50M x 128 item table
    python pipelines/bench_sharded.py --nproc 1 2 --sharding column_wise --min-column-shard 64
    # CPU smoke run (gloo, a 20K x 32 table, seconds; the numbers say nothing about GPUs):
    python pipelines/bench_sharded.py --quick

What is timed: ``--steps`` training steps after ``--warmup`` (forward through the sharded collection and
the encoder, sampled-softmax loss, backward with the fused row-wise Adagrad update of the table, AdamW
step of the dense part), on ``--batches`` pre-built batches already on the device, so data loading is
not included. Each process gets ``--users`` users of ``--events`` events per step (weak scaling: the
global batch grows with the number of processes). Item ids are uniform over the catalogue (every lookup
misses every cache: the hard case). events/s = processes * users * events * steps / the slowest
process's time. Peak memory is ``torch.cuda.max_memory_allocated`` on the busiest GPU.

Memory: each process builds the unsharded table on the host before TorchRec shards it (as ``ksa-rec
fit`` does): 50M x 128 float32 = 25.6 GB of host memory per process for a moment. On one GPU the whole
table and its row-wise Adagrad state (25.8 GB) live on that GPU.

The script starts its own processes (torch.multiprocessing, NCCL on CUDA, gloo on CPU), one size of
``--nproc`` after the other, and prints a markdown table; ``--out DIR`` also writes
``bench_sharded.{md,json}`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import command, header, machine, now, write_outputs  # noqa: E402

from ksa_rec.data.batch import SequenceBatch, random_training_batch  # noqa: E402
from ksa_rec.data.schema import ITEM, DataSpec  # noqa: E402
from ksa_rec.models.seqrec import SeqRecModel  # noqa: E402
from ksa_rec.modules.config import EncoderConfig  # noqa: E402
from ksa_rec.modules.losses import LossConfig  # noqa: E402
from ksa_rec.training.sharding import (  # noqa: E402
    SHARDING_TYPES,
    EmbeddingOptimConfig,
    ShardingConfig,
    shard_model,
    sharded_parameter_ids,
)


@dataclass
class BenchConfig:
    num_items: int = 50_000_000
    dim: int = 128
    heads: int = 4
    pattern: str = "full,full"
    users: int = 128
    """Users per process per step."""
    events: int = 200
    """Events per user."""
    negatives: int = 1024
    """Uniform sampled-softmax negatives (plus the in-batch ones)."""
    sharding: str = "row_wise"
    min_column_shard: int | None = None
    embedding_lr: float = 0.01
    dense_lr: float = 1e-3
    batches: int = 4
    warmup: int = 5
    steps: int = 20
    device: str = "auto"
    """auto (CUDA when available), cuda or cpu."""


QUICK = dict(num_items=20_000, dim=32, heads=2, users=8, events=32, negatives=64, batches=2, warmup=2, steps=5,
             device="cpu")


class _LossStep(nn.Module):
    """DMP runs the forward of the module it wraps (DDP must see the forward): here, the training loss."""

    def __init__(self, model: SeqRecModel):
        super().__init__()
        self.model = model

    def forward(self, batch: SequenceBatch) -> Tensor:
        return self.model.loss(batch)


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    cfg = BenchConfig(**cfg_dict)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = cfg.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            device_id=device if cuda else None)
    torch.manual_seed(0)
    model = SeqRecModel(EncoderConfig(dim=cfg.dim, num_heads=cfg.heads, pattern=cfg.pattern, dropout=0.0),
                        LossConfig(kind="sampled", num_uniform_negatives=cfg.negatives),
                        DataSpec(num_items=cfg.num_items))
    step = _LossStep(model)
    sharding = ShardingConfig(sharding_types={ITEM: cfg.sharding}, min_column_shard=cfg.min_column_shard,
                              embedding_optimizer=EmbeddingOptimConfig(kind="rowwise_adagrad", lr=cfg.embedding_lr))
    dmp = shard_model(step, sharding, device, local_world_size=world)
    dmp.init_data_parallel()
    fused = sharded_parameter_ids(step)
    dense = [p for p in step.parameters() if id(p) not in fused]
    optimizer = torch.optim.AdamW(dense, lr=cfg.dense_lr, fused=cuda)
    generator = torch.Generator().manual_seed(1 + rank)
    batches = [random_training_batch(cfg.users, cfg.events, cfg.num_items, generator).to(device)
               for _ in range(cfg.batches)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    start = 0.0
    for i in range(cfg.warmup + cfg.steps):
        if i == cfg.warmup:
            sync()
            dist.barrier()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        loss = dmp(batches[i % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    stats = torch.tensor([time.perf_counter() - start,
                          torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0, loss.item()],
                         dtype=torch.float64, device=device)
    dist.all_reduce(stats[:2], op=dist.ReduceOp.MAX)
    if rank == 0:
        seconds, peak_gb, last_loss = stats.tolist()
        events = world * cfg.users * cfg.events * cfg.steps
        weight = step.state_dict()[f"model.embedding.collection.embeddings.{ITEM}.weight"]
        shards = [list(m.shard_sizes) for m in weight.metadata().shards_metadata]
        row = {"processes": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "step_ms": 1000 * seconds / cfg.steps, "events_per_s": events / seconds,
               "events_per_s_per_process": events / seconds / world, "peak_gpu_gb": peak_gb,
               "item_shards": shards, "last_loss": last_loss}
        Path(out).write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: BenchConfig, world: int, timeout_s: float) -> dict:
    """One measurement with ``world`` processes; returns rank 0's result row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        context = mp.start_processes(_worker, args=(world, _free_port(), asdict(cfg), str(out)), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world} process(es) did not finish in {timeout_s:.0f} s")
        return json.loads(out.read_text())


def markdown(cfg: BenchConfig, rows: list[dict], cmd: str, info: dict, date: str) -> str:
    base = rows[0]["events_per_s"] if rows and rows[0]["processes"] == 1 else None
    lines = [*header("Sharded training throughput", cmd, info, date), "",
             f"Item table {cfg.num_items:,} x {cfg.dim} ({cfg.sharding}), fused row-wise Adagrad; encoder "
             f"`{cfg.pattern}`, dim {cfg.dim}; {cfg.users} users x {cfg.events} events per process per step, "
             f"{cfg.negatives} uniform negatives; {cfg.steps} timed steps after {cfg.warmup}.", "",
             "| processes | device | step ms | events/s | events/s per process | speed-up | peak GPU GB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup = f"{row['events_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {row['processes']} | {row['device']} | {row['step_ms']:.1f} | {row['events_per_s']:,.0f} | "
                     f"{row['events_per_s_per_process']:,.0f} | {speedup} | {row['peak_gpu_gb']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with a small table")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--out", type=Path, help="directory for bench_sharded.{md,json}")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    defaults = BenchConfig()
    for name in ("num_items", "dim", "users", "events", "negatives", "steps", "warmup", "min_column_shard"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--sharding", choices=SHARDING_TYPES, default=defaults.sharding)
    parser.add_argument("--pattern", default=defaults.pattern)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None)
    args = parser.parse_args(argv)

    cfg = replace(defaults, **QUICK) if args.quick else defaults
    overrides = {k: getattr(args, k) for k in ("num_items", "dim", "users", "events", "negatives", "steps", "warmup",
                                               "min_column_shard", "device") if getattr(args, k) is not None}
    cfg = replace(cfg, sharding=args.sharding, pattern=args.pattern, **overrides)
    if cfg.device == "auto":
        cfg = replace(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and max(args.nproc) > torch.cuda.device_count():
        parser.error(f"--nproc {max(args.nproc)} needs as many GPUs; {torch.cuda.device_count()} visible")

    rows = []
    for world in args.nproc:
        rows.append(run(cfg, world, args.timeout))
        print(f"{world} process(es): {rows[-1]['events_per_s']:,.0f} events/s", flush=True)
    info = machine(torch.device("cuda" if cfg.device == "cuda" else "cpu"))
    report = markdown(cfg, rows, command(__file__, argv), info, now())
    print(report)
    if args.out:
        write_outputs(args.out / "bench_sharded", report, {"config": asdict(cfg), "machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
