"""Batch-scoring scaling: ``ksa-rec score --devices N`` over N = 1, 2, 4, 8 processes (one per GPU), users/s,
speed-up, and whether the merged output equals the one-process output (issue 19).

How to run (repository root)::

    # A host with 8 GPUs, issue 19's sizes: 1M users x 1K events (1e9 events), a 1M-item catalogue:
    python pipelines/bench_score_scaling.py --devices 1 2 4 8 --out docs/results/raw/score-scaling
    # smaller first (the same sizes per user, 1/10 of the users):
    python pipelines/bench_score_scaling.py --users 100000 --devices 1 2 4 8 --out OUT
    # CPU smoke run (gloo, 2 processes, tiny sizes, about a minute on 2 cores; the numbers say nothing):
    python pipelines/bench_score_scaling.py --quick --out OUT

Steps:

1. **Events**: ``--users`` users with exactly ``--events`` events each, items uniform over ``--items``
   ids, timestamps increasing per user, written to ``WORK/events.parquet`` (integer ids, which ``ksa-rec``
   reads as strings) in row groups of ``--chunk-users`` users, so the generator's memory stays small.
2. **Checkpoint**: a ``RecModule`` built, not trained (``--dim``, ``--pattern``; its initial weights:
   speed and agreement between process counts do not depend on training), with a vocabulary of all
   ``--items`` ids, saved as a ``ksa-rec fit`` checkpoint file at ``WORK/model.ckpt``.
3. **Scoring**: for every N of ``--devices``, ``python -m ksa_rec.cli score --checkpoint WORK/model.ckpt
   --events WORK/events.parquet --output WORK/scores-N.parquet --accelerator A --devices N`` (whole
   histories). Measured: the command's wall time; from its summary line, the seconds rank 0 spent reading
   and preparing the events and the seconds from the start of the predict loop to the merged file
   (every process scoring its share, then rank 0's merge); the host memory of the whole process tree,
   sampled every 0.2 s from /proc. users/s = users / scoring seconds; speed-up against N = 1.
4. **Agreement**: each ``scores-N.parquet``, sorted by user (the merged file holds rank 0's users, then
   rank 1's, ...), against ``scores-1.parquet``: same users and event counts, same top-K item lists
   (users whose list differs are counted), and the largest score difference. Batches hold other users
   with other process counts, so float results may differ in the last bits; a list can then differ only
   where two items' scores nearly tie.

Memory: every process reads and prepares the *whole* event file before it takes its share of the users
(``serving/jobs.py``), so host memory grows with N: about N times that of one process. Measured on CPU
here (read_interactions + build_interactions, polars): about 150 bytes of peak memory per event per
process at 1e7 events, i.e. ~150 GB per process for 1e9 events; 8 processes would need ~1.2 TB. So
after the 1-process run the script skips every N whose N x (measured 1-process peak) exceeds 90% of the
host's available memory, with a row saying so (``--no-memory-check`` runs it anyway). ``--users 100000``
keeps issue 19's history length and catalogue at 1/10 of the events.

Writes ``OUT/bench_score_scaling.{md,json}`` and keeps ``WORK`` (default ``OUT/work``; ``--clean``
removes the score files at the end). ``--quick``: 64 users x 40 events, 500 items, dim 16, CPU, N = 1 2.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import command, header, machine, now, package_commit, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"\(([\d,]+) users; scored in ([\d.]+) s on (\d+) process\(es\): [\d,]+ users/s; "
                     r"input read in ([\d.]+) s\)")
QUICK = {"users": 64, "events": 40, "items": 500, "dim": 16, "heads": 2, "pattern": "ksa,full", "chunk_size": 4,
         "window": 2, "devices": [1, 2], "accelerator": "cpu", "batch_size": 16, "chunk_users": 16}


# ---- 1. events ---------------------------------------------------------------------------------------------
def write_events(path: Path, users: int, events: int, items: int, chunk_users: int, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for first in range(0, users, chunk_users):
            count = min(chunk_users, users - first)
            user = np.repeat(np.arange(first, first + count, dtype=np.int64), events)
            # Increasing per user (gaps of 1 s to 1 day), never equal: no duplicate events.
            gaps = rng.integers(1, 86_400, size=(count, events), dtype=np.int64)
            stamps = 1_600_000_000 + np.cumsum(gaps, axis=1).reshape(-1)
            item = rng.integers(0, items, size=count * events, dtype=np.int64)
            writer.write_table(pa.table({"user_id": user, "item_id": item, "timestamp": stamps}, schema=schema))
    tmp.replace(path)  # a run killed while writing leaves no file that looks complete


# ---- 2. checkpoint -----------------------------------------------------------------------------------------
def write_checkpoint(path: Path, items: int, dim: int, heads: int, pattern: str, chunk_size: int, window: int,
                     seed: int) -> None:
    import pytorch_lightning
    import torch

    from ksa_rec.data.schema import RESERVED_IDS, DataSpec
    from ksa_rec.data.vocab import Vocab
    from ksa_rec.modules.config import EncoderConfig
    from ksa_rec.modules.losses import LossConfig
    from ksa_rec.training.module import CHECKPOINT_VOCAB_KEY, RecModule

    torch.manual_seed(seed)
    module = RecModule(encoder=EncoderConfig(dim=dim, num_heads=heads, pattern=pattern, dropout=0.0,
                                             chunk_size=chunk_size, window=window),
                       loss=LossConfig(kind="sampled"), data_spec=DataSpec(num_items=items + RESERVED_IDS))
    # The ids as the reader turns the integer column into text: "0", "1", ...
    vocab = {"items": Vocab([str(i) for i in range(items)]).to_dict(), "features": {}}
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                  CHECKPOINT_VOCAB_KEY: vocab, "pytorch-lightning_version": pytorch_lightning.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


# ---- 3. scoring --------------------------------------------------------------------------------------------
def _tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, todo, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            pass
        todo += children.get(pid, [])
    return total


def run_score(work: Path, devices: int, accelerator: str, batch_size: int, top_k: int, log: Path) -> dict:
    output = work / f"scores-{devices}.parquet"
    args = [sys.executable, "-m", "ksa_rec.cli", "score", "--checkpoint", str(work / "model.ckpt"), "--events",
            str(work / "events.parquet"), "--output", str(output), "--accelerator", accelerator, "--devices",
            str(devices), "--batch-size", str(batch_size), "--top-k", str(top_k)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    peak = [0]
    started = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=sink, text=True)
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_rss_bytes(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = process.communicate()
        done.set()
        sampler.join()
    wall_s = time.perf_counter() - started
    found = SUMMARY.search(stdout)
    row = {"devices": devices, "returncode": process.returncode, "wall_s": round(wall_s, 2),
           "peak_host_gb": round(peak[0] / 1e9, 2), "command": " ".join(args[1:]), "log": str(log)}
    if process.returncode != 0 or found is None:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no stderr)"]
        return row | {"error": tail[0][:300]}
    users, score_s, processes, prepare_s = found.groups()
    return row | {"users": int(users.replace(",", "")), "score_s": float(score_s), "processes": int(processes),
                  "prepare_s": float(prepare_s), "output": str(output)}


def available_gb() -> float | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def memory_refusal(devices: int, one_process_gb: float | None, free_gb: float | None) -> str | None:
    """Why ``devices`` processes would not fit the host, judged from the measured 1-process peak (every
    process reads the whole event file), or None."""
    if one_process_gb is None or free_gb is None or devices * one_process_gb <= 0.9 * free_gb:
        return None
    return (f"skipped: about {devices * one_process_gb:.0f} GB of host memory ({devices} x the 1-process peak "
            f"{one_process_gb:.1f} GB), {free_gb:.0f} GB available (--no-memory-check runs it anyway)")


# ---- 4. agreement ------------------------------------------------------------------------------------------
def compare(reference: Path, other: Path) -> dict:
    """``other`` against ``reference``, both sorted by user."""
    import polars as pl

    ref, got = (pl.read_parquet(p).sort("user_id") for p in (reference, other))
    if ref.height != got.height or not ref["user_id"].equals(got["user_id"]):
        return {"same_users": False, "identical": False}
    differing_lists = int((ref["item_ids"] != got["item_ids"]).sum())
    differing_counts = int((ref["event_count"] != got["event_count"]).sum())
    # Score differences where the lists agree (elsewhere the positions hold other items).
    same = ref["item_ids"] == got["item_ids"]
    a = ref.filter(same)["scores"].explode().to_numpy()
    b = got.filter(same)["scores"].explode().to_numpy()
    max_diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return {"same_users": True, "differing_item_lists": differing_lists, "differing_event_counts": differing_counts,
            "max_score_diff": max_diff,
            "identical": differing_lists == 0 and differing_counts == 0 and max_diff == 0.0}


# ---- report ------------------------------------------------------------------------------------------------
def markdown(rows: list[dict], settings: dict, cmd: str, info: dict, date: str) -> str:
    lines = header("Batch scoring on several processes (ksa-rec score --devices N)", cmd, info, date)
    lines += [f"- code: {settings['commit'] or 'unknown'}",
              f"- data: {settings['users']:,} users x {settings['events']:,} events, {settings['items']:,} items; "
              f"model dim {settings['dim']}, pattern `{settings['pattern']}`, top-{settings['top_k']}, "
              f"batches of {settings['batch_size']} users, accelerator {settings['accelerator']}",
              f"- events written in {settings['events_s']:.1f} s, checkpoint built in {settings['checkpoint_s']:.1f} s",
              "", "| processes | wall s | input read s (rank 0) | scoring s | users/s | speed-up | efficiency "
              "| peak host GB | same as 1 process |", "|---|---|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["devices"] == 1 and "score_s" in r), None)
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['devices']} | - | - | - | - | - | - | - | {r['skipped']} |")
            continue
        if "score_s" not in r:
            lines.append(f"| {r['devices']} | {r['wall_s']} | - | - | - | - | - | {r['peak_host_gb']} | "
                         f"failed (exit {r['returncode']}): `{r.get('error', '')}` |")
            continue
        rate = r["users"] / r["score_s"]
        speedup = base["score_s"] / r["score_s"] if base else None
        agree = r.get("agreement", {})
        if r["devices"] == 1:
            same = "(reference)"
        elif not agree.get("same_users", False):
            same = "**no**: other users"
        elif agree["identical"]:
            same = "identical"
        else:
            same = (f"{agree['differing_item_lists']} top-K lists differ, {agree['differing_event_counts']} event "
                    f"counts differ, max score diff {agree['max_score_diff']:.2g}")
        scaled = ("-", "-") if speedup is None else (f"{speedup:.2f}x", f"{100 * speedup / r['devices']:.0f}%")
        lines.append(f"| {r['devices']} | {r['wall_s']:.1f} | {r['prepare_s']:.1f} | {r['score_s']:.2f} | "
                     f"{rate:,.0f} | {scaled[0]} | {scaled[1]} | {r['peak_host_gb']} | {same} |")
    lines += ["", "Scoring s: rank 0, from the start of the predict loop to the merged file (all processes have "
              "read the events by then). Wall s also holds start-up, every process's reading of the whole event "
              "file and the model load."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for bench_score_scaling.{md,json}")
    p.add_argument("--work", type=Path, default=None, help="events, checkpoint and score files (default OUT/work)")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=1_000, help="events per user")
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="process counts (1 comes first)")
    p.add_argument("--accelerator", default="gpu", help="gpu (one process per GPU) or cpu (gloo)")
    p.add_argument("--batch-size", type=int, default=256, help="users per batch")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--pattern", default="ksa*3,full")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--chunk-users", type=int, default=10_000, help="users per row group of the event file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean", action="store_true", help="remove the score files at the end")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run every --devices count even where N x the 1-process peak exceeds the free host memory")
    p.add_argument("--quick", action="store_true", help="CPU smoke run at tiny sizes (2 processes)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name in ("users", "events", "items", "batch_size", "top_k", "chunk_users"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if min(args.devices) < 1:
        p.error(f"--devices: every count must be >= 1, got {args.devices}")
    devices = sorted(set(args.devices) | {1})  # 1 process is the reference of speed-up and agreement
    work = (args.work or args.out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)

    started = time.perf_counter()
    write_events(work / "events.parquet", args.users, args.events, args.items, args.chunk_users, args.seed)
    events_s = time.perf_counter() - started
    started = time.perf_counter()
    write_checkpoint(work / "model.ckpt", args.items, args.dim, args.heads, args.pattern, args.chunk_size, args.window,
                     args.seed)
    checkpoint_s = time.perf_counter() - started

    rows = []
    for n in devices:
        one = next((r["peak_host_gb"] for r in rows if r["devices"] == 1 and r["returncode"] == 0), None)
        refusal = None if args.no_memory_check else memory_refusal(n, one, available_gb())
        if refusal:
            print(f"--devices {n}: {refusal}", flush=True)
            rows.append({"devices": n, "returncode": None, "skipped": refusal})
            continue
        row = run_score(work, n, args.accelerator, args.batch_size, args.top_k, work / "logs" / f"score-{n}.log")
        print(f"--devices {n}: exit {row['returncode']}, wall {row['wall_s']} s" +
              (f", scoring {row['score_s']} s" if "score_s" in row else f": {row.get('error')}"), flush=True)
        rows.append(row)
    reference = next((r for r in rows if r["devices"] == 1 and "output" in r), None)
    for row in rows:
        if reference is not None and row is not reference and "output" in row:
            row["agreement"] = compare(Path(reference["output"]), Path(row["output"]))
    if args.clean:
        for row in rows:
            Path(row.get("output", work / "none")).unlink(missing_ok=True)

    import torch

    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu")
    info = machine(device) | ({"gpus": torch.cuda.device_count()} if device.type == "cuda" else {})
    settings = {key: getattr(args, key) for key in ("users", "events", "items", "dim", "heads", "pattern",
                                                    "chunk_size", "window", "batch_size", "top_k", "accelerator")}
    settings |= {"events_s": events_s, "checkpoint_s": checkpoint_s, "commit": package_commit(), "work": str(work)}
    cmd, date = command(__file__, argv), now()
    md, js = write_outputs(args.out / "bench_score_scaling", markdown(rows, settings, cmd, info, date),
                           {"command": cmd, "machine": info, "date": date, "settings": settings, "rows": rows})
    print(md.read_text())
    print(f"wrote {md} and {js}")
    ran = [r for r in rows if "skipped" not in r]
    ok = all(r["returncode"] == 0 for r in ran) and all(r.get("agreement", {}).get("same_users", True) for r in ran)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
