"""The README's demo: train on the built-in synthetic data (CPU), print validation and test metrics,
then score users in batch and replay held-back events through the streaming job.

How to run (from the repository root, after `make venv`; `make demo` does both):

    .venv/bin/python pipelines/demo.py [extra LightningCLI args, e.g. --trainer.max_epochs=2]

Steps and where their outputs land:
1. ``ksa-rec fit --config configs/demo.yaml``: checkpoints, CSV/TensorBoard logs and metrics.json under
   runs/csv/version_N/ (the generated events are cached under .cache/ksa_rec/synthetic/);
2. 40 users' histories without their last 8 events -> runs/demo/history.parquet, the 8 events each ->
   runs/demo/heldback.jsonl;
3. ``ksa-rec score`` over the histories -> runs/demo/scores.parquet;
4. ``ksa-rec stream`` over the histories (builds the states in runs/demo/states.db), then over the
   held-back events -> fresh top-10 per touched user in runs/demo/stream.jsonl.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import polars as pl

from ksa_rec.cli import main as ksa_rec

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("runs/demo")
USERS, HELD_BACK = 40, 8


def latest_metrics() -> dict:
    found = sorted(Path("runs/csv").glob("version_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())


def split_events(events_file: Path) -> tuple[Path, Path]:
    events = pl.read_parquet(events_file).select("user_id", "item_id", "timestamp", "category")
    users = events["user_id"].unique(maintain_order=True)[:USERS].to_list()
    chosen = events.filter(pl.col("user_id").is_in(users))
    position = pl.int_range(pl.len()).over("user_id")
    held = position >= pl.len().over("user_id") - HELD_BACK
    history, heldback = OUT / "history.parquet", OUT / "heldback.jsonl"
    chosen.filter(~held).write_parquet(history)
    chosen.filter(held).sort("timestamp", maintain_order=True).write_ndjson(heldback)
    return history, heldback


def run(extra: list[str]) -> int:
    started = time.time()
    if ksa_rec(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), *extra]):
        return 1
    checkpoint = latest_metrics()["checkpoint"]
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    events_file = next(Path(".cache/ksa_rec/synthetic").glob("events-*.parquet"))
    history, heldback = split_events(events_file)
    steps = [
        ["score", "--checkpoint", checkpoint, "--events", str(history), "--output", str(OUT / "scores.parquet")],
        ["stream", "--checkpoint", checkpoint, "--events", str(history), "--state", str(OUT / "states.db"),
         "--output", str(OUT / "history-stream.jsonl")],
        ["stream", "--checkpoint", checkpoint, "--events", str(heldback), "--state", str(OUT / "states.db"),
         "--output", str(OUT / "stream.jsonl"), "--chunk-rows", "64"],
    ]
    for step in steps:
        if ksa_rec(step):
            return 1
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"  checkpoint:            {checkpoint}")
    print(f"  metrics (95% CIs):     {Path(checkpoint).parents[1] / 'metrics.json'}")
    print(f"  batch scores:          {OUT / 'scores.parquet'}  ({USERS} users, top-10, seen items excluded)")
    print(f"  user states:           {OUT / 'states.db'}  (SQLite)")
    print(f"  streamed top-10:       {OUT / 'stream.jsonl'}  ({USERS} users x {HELD_BACK} held-back events)")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
