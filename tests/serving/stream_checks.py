"""Helpers of the end-to-end serving tests: run ``ksa-rec stream`` in-process, read a store raw, and
compare stores and outputs of two runs."""

import json
import sqlite3
from pathlib import Path

import torch

from ksa_rec.cli import main as ksa_rec
from ksa_rec.serving.artifact import ServingModel
from ksa_rec.serving.state import UserState


def stream(checkpoint, events, state, *extra) -> int:
    return ksa_rec(["stream", "--checkpoint", str(checkpoint), "--events", str(events), "--state", str(state),
                    "--accelerator", "cpu", *extra])


def stream_then_score(checkpoint, events, work: Path, *stream_args: str):
    """Stream ``events`` into a new store under ``work``, then score the same histories whole: (the newest
    streamed record per user, the scored rows as a polars frame)."""
    import polars as pl

    assert stream(checkpoint, events, work / "s.db", *stream_args) == 0
    assert ksa_rec(["score", "--checkpoint", str(checkpoint), "--events", str(events), "--output",
                    str(work / "scores.parquet"), "--accelerator", "cpu"]) == 0
    return last_records(work / "s.db.outputs.jsonl"), pl.read_parquet(work / "scores.parquet")


def assert_same_topk(streamed: dict[str, dict], scored) -> None:
    """Every scored user's streamed top-K: the same items and event count, scores up to rounding."""
    assert scored.height == len(streamed)
    for row in scored.iter_rows(named=True):
        mine = streamed[row["user_id"]]
        assert (mine["event_count"], mine["item_ids"]) == (row["event_count"], row["item_ids"])
        assert max(abs(a - b) for a, b in zip(mine["scores"], row["scores"])) < 1e-4


def store_dump(path: Path) -> tuple[dict, dict]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT user_id, state FROM states")), dict(db.execute("SELECT key, value FROM meta"))
    finally:
        db.close()


def last_records(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out[record["user_id"]] = record
    return out


def event_counts(checkpoint, path: Path) -> dict[str, int]:
    model_id = ServingModel.load(checkpoint).model_id
    return {u: UserState.from_bytes(b, model_id, u).event_count for u, b in store_dump(path)[0].items()}


def assert_same_store(checkpoint, got_path: Path, want_path: Path, tol: float = 1e-5) -> None:
    """Same users, bookkeeping, event counts, replay windows, cached token identities and seen sets; float
    tensors equal up to ``tol`` (CPU kernels may sum in another order when buffers land at other
    addresses; pass 1e-4 where the two runs cut their micro-batches differently)."""
    (got, got_meta), (want, want_meta) = store_dump(got_path), store_dump(want_path)
    assert {k: v for k, v in got_meta.items() if not k.startswith("sink:")} == \
        {k: v for k, v in want_meta.items() if not k.startswith("sink:")}
    assert_same_states(checkpoint, got, want, tol)


def assert_same_states(checkpoint, got: dict[str, bytes], want: dict[str, bytes], tol: float = 1e-5) -> None:
    """``assert_same_store`` on two {user: blob} maps (from any store)."""
    model_id = ServingModel.load(checkpoint).model_id
    assert got.keys() == want.keys()
    for user in want:
        a, b = (UserState.from_bytes(x[user], model_id, user) for x in (got, want))
        assert (a.event_count, a.last_timestamp, a.last_item) == (b.event_count, b.last_timestamp, b.last_item)
        assert torch.equal(a.seen, b.seen)
        assert torch.equal(a.recent_ids, b.recent_ids) and torch.equal(a.recent_ts, b.recent_ts)
        torch.testing.assert_close(a.vector, b.vector, atol=tol, rtol=tol)
        for la, lb in zip(a.layers, b.layers):
            for key in la:
                if key.endswith("idx"):
                    assert torch.equal(la[key], lb[key])
                else:
                    torch.testing.assert_close(la[key], lb[key], atol=tol, rtol=tol)


def assert_same_outputs(got: Path, want: Path) -> None:
    """Every record once, in order, with the same top-K (scores up to rounding)."""
    got_rows = [json.loads(line) for line in got.read_text().splitlines()]
    want_rows = [json.loads(line) for line in want.read_text().splitlines()]
    assert len(got_rows) == len(want_rows)
    for a, b in zip(got_rows, want_rows):
        assert (a["user_id"], a["event_count"], a["row"], a["item_ids"]) == \
            (b["user_id"], b["event_count"], b["row"], b["item_ids"])
        assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) < 1e-4
