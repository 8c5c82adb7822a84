"""What storing user states in bf16 (``--state-dtype bf16``) costs: state bytes, top-K agreement and score
error against fp32 states, after streaming the same events through ``ksa-rec stream``.

How to run (repository root, a CPU is enough; about a minute on the smoke model):

    python pipelines/compare_state_dtype.py --checkpoint CKPT --events EVENTS.parquet --out OUT
    # no --checkpoint: trains the smoke model (configs/smoke.yaml) into OUT first and streams its events
    # --users N: stream only the first N users of EVENTS (long histories: a few users are enough)

Both stores get the same events, micro-batches of ``--chunk-rows``; bf16 states are rounded at every
commit, so the error compounds over each user's history. Compared: the final states' top-K, and every
recommendation the two streams wrote along the way (``stepwise``). Writes ``OUT/state-dtype.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_smoke(work: Path) -> tuple[Path, Path]:
    """The smoke model (configs/smoke.yaml, one epoch) and its synthetic events."""
    from ksa_rec.training.cli import run_lightning

    run_lightning(["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--trainer.max_epochs", "1",
                   "--trainer.default_root_dir", str(work / "fit"), "--trainer.logger", "false",
                   "--data.cache_dir", str(work / "cache")])
    return next((work / "fit").rglob("last.ckpt")), next((work / "cache" / "synthetic").glob("*.parquet"))


def first_users(events: Path, users: int, out: Path) -> Path:
    """The events of the first ``users`` users of ``events`` (parquet), in their file order, written to ``out``."""
    import polars as pl

    frame = pl.read_parquet(events)
    keep = frame["user_id"].unique(maintain_order=True)[:users]
    frame.filter(pl.col("user_id").is_in(keep.implode())).write_parquet(out)
    return out


def stepwise(fp32_recs: Path, bf16_recs: Path, buckets: int = 5) -> list[dict]:
    """Every recommendation the two streams wrote (one per touched user per micro-batch), paired by user and event
    count: how often bf16 states gave the same top-K as fp32 ones, along the histories. One row for all steps,
    then one per bucket of event counts (``buckets`` equal ranges)."""
    def load(path: Path) -> dict:
        return {(r["user_id"], r["event_count"]): r for r in map(json.loads, path.read_text().splitlines())}

    a, b = load(fp32_recs), load(bf16_recs)
    if a.keys() != b.keys():
        raise ValueError(f"{fp32_recs} and {bf16_recs} hold different (user, event count) steps")
    steps = []
    for key in sorted(a, key=lambda k: k[1]):
        x, y = a[key]["item_ids"], b[key]["item_ids"]
        errors = [abs(p - q) for p, q in zip(a[key]["scores"], b[key]["scores"])]
        steps.append((key[1], len(set(x) & set(y)) / max(len(x), 1), x == y, x[:1] == y[:1], max(errors, default=0.0)))
    top = max(s[0] for s in steps)
    edges = [round(top * i / buckets) for i in range(buckets + 1)]

    def row(label: str, part: list) -> dict:
        n = len(part)
        return {"events": label, "steps": n, "overlap_mean": sum(s[1] for s in part) / n,
                "overlap_min": min(s[1] for s in part), "same_set": sum(s[1] == 1 for s in part) / n,
                "same_order": sum(s[2] for s in part) / n, "same_top1": sum(s[3] for s in part) / n,
                "score_err_max_mean": sum(s[4] for s in part) / n, "score_err_max": max(s[4] for s in part)}

    rows = [row("all", steps)]
    for lo, hi in zip(edges, edges[1:]):
        part = [s for s in steps if lo < s[0] <= hi]
        if part:
            rows.append(row(f"{lo + 1}-{hi}", part))
    return rows


def main(argv: list[str] | None = None) -> dict:
    from ksa_rec.cli import main as ksa_rec
    from ksa_rec.serving.artifact import ServingModel
    from ksa_rec.serving.engine import StreamEngine
    from ksa_rec.serving.store import SqliteStateStore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--events", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--users", type=int, help="stream only the first N users of --events (in order of appearance)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint, events = (args.checkpoint, args.events) if args.checkpoint else train_smoke(args.out / "smoke")
    if args.users:
        events = first_users(events, args.users, args.out / "events.parquet")
    stores = {}
    for dtype in ("fp32", "bf16"):
        stores[dtype] = args.out / f"states-{dtype}.db"
        for stale in args.out.glob(f"states-{dtype}.db*"):
            stale.unlink()
        code = ksa_rec(["stream", "--checkpoint", str(checkpoint), "--events", str(events), "--state",
                        str(stores[dtype]), "--state-dtype", dtype, "--chunk-rows", str(args.chunk_rows),
                        "--accelerator", "cpu", "--output", str(args.out / f"recs-{dtype}.jsonl"), "--overwrite"])
        assert code == 0, f"stream with --state-dtype {dtype} failed"
    engine = StreamEngine(ServingModel.load(checkpoint), top_k=args.top_k)
    blobs = {}
    for dtype, path in stores.items():
        store = SqliteStateStore(path, read_only=True)
        blobs[dtype] = {u: b for rows in store.scan(1000) for u, b in rows}
        store.close()
    users = sorted(blobs["fp32"])
    states = {d: engine.decode_states(users, blobs[d]) for d in blobs}
    recs = {d: engine.recommend(users, states[d], [0] * len(users)) for d in states}
    overlap, same_order, top1, score_err, vector_err = [], [], [], [], []
    for i in range(len(users)):
        a, b = recs["fp32"].item_ids[i], recs["bf16"].item_ids[i]
        overlap.append(len(set(a) & set(b)) / len(a))
        same_order.append(float(a == b))
        top1.append(float(a[0] == b[0]))
        score_err.extend(abs(x - y) for x, y in zip(recs["fp32"].scores[i], recs["bf16"].scores[i]))
        vector_err.append(float((states["fp32"][i].vector - states["bf16"][i].vector).abs().max()))
    fp32_scores = [abs(x) for row in recs["fp32"].scores for x in row]
    result = {
        "checkpoint": str(checkpoint), "events": str(events), "users": len(users), "top_k": args.top_k,
        "events_per_user": {u: s.event_count for u, s in zip(users, states["fp32"])},
        "chunk_rows": args.chunk_rows, "torch": torch.__version__,
        "blob_bytes_per_user": {d: sum(map(len, blobs[d].values())) / len(users) for d in blobs},
        "state_bytes_per_user": {d: sum(s.cast(torch.bfloat16).num_bytes if d == "bf16" else s.num_bytes
                                        for s in states[d]) / len(users) for d in states},
        "topk_overlap_mean": sum(overlap) / len(users), "topk_overlap_min": min(overlap),
        "topk_same_order": sum(same_order) / len(users), "top1_agreement": sum(top1) / len(users),
        "score_abs_err_mean": sum(score_err) / len(score_err), "score_abs_err_max": max(score_err),
        "score_abs_mean_fp32": sum(fp32_scores) / len(fp32_scores),
        "vector_abs_err_max": max(vector_err),
        "stepwise": stepwise(args.out / "recs-fp32.jsonl", args.out / "recs-bf16.jsonl"),
    }
    (args.out / "state-dtype.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "state-dtype.md").write_text(table(result))
    print(table(result))
    return result


def table(r: dict) -> str:
    b, s = r["blob_bytes_per_user"], r["state_bytes_per_user"]
    return "\n".join([
        "| | fp32 states | bf16 states |", "|---|---|---|",
        f"| stored blob bytes / user (mean) | {b['fp32']:,.0f} | {b['bf16']:,.0f} ({b['bf16'] / b['fp32']:.2f}x) |",
        f"| attention-state bytes / user (mean) | {s['fp32']:,.0f} | {s['bf16']:,.0f} ({s['bf16'] / s['fp32']:.2f}x) |",
        f"| top-{r['top_k']} overlap with fp32 (mean / min over {r['users']} users) | 1 | "
        f"{r['topk_overlap_mean']:.3f} / {r['topk_overlap_min']:.2f} |",
        f"| same top-{r['top_k']} in the same order | 1 | {r['topk_same_order']:.3f} |",
        f"| same top-1 | 1 | {r['top1_agreement']:.3f} |",
        f"| score abs error at equal rank (mean / max; mean fp32 score {r['score_abs_mean_fp32']:.3f}) | 0 | "
        f"{r['score_abs_err_mean']:.4f} / {r['score_abs_err_max']:.4f} |",
        f"| user vector max abs error | 0 | {r['vector_abs_err_max']:.4f} |", "",
        f"Every step of the streams (one recommendation per touched user per micro-batch of {r['chunk_rows']} rows), "
        "bf16 against fp32, by the user's event count:", "",
        "| events | steps | top-K overlap (mean / min) | same set | same order | same top-1 | "
        "largest score error a step (mean / max) |", "|---|---|---|---|---|---|---|",
        *(f"| {s['events']} | {s['steps']:,} | {s['overlap_mean']:.4f} / {s['overlap_min']:.2f} | "
          f"{s['same_set']:.4f} | {s['same_order']:.4f} | {s['same_top1']:.4f} | "
          f"{s['score_err_max_mean']:.4f} / {s['score_err_max']:.4f} |" for s in r["stepwise"]), ""])


if __name__ == "__main__":
    main()
