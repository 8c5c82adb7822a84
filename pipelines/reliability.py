"""Reliability of ``ksa-rec stream`` and ``ksa-rec score``: a fault matrix, ``kill -9`` at each commit
boundary over 20 restarts, and two 100,000-event soaks (many users with short histories, fewer users with
longer ones) with the writer's resident memory sampled over time.

How to run (repository root; about 10 minutes on a 2-core CPU):

    PYTHONPATH=. python pipelines/reliability.py --date 2026-12-06 --machine "2-core CPU"
    PYTHONPATH=. python pipelines/reliability.py --quick       # 10 restarts, 20,000-event soaks: a try-out
    PYTHONPATH=. python pipelines/reliability.py --from-raw docs/results/raw/reliability-2026-12-06.json

Writes ``docs/reliability.md`` (the report), ``docs/results/raw/reliability-<date>.json`` (every result,
the RSS samples included) and ``docs/results/raw/reliability-<date>.log`` (each command with the tail of
its output). Everything runs as a user would run it: ``python -m ksa_rec.cli ...`` in a subprocess, in a
scratch directory, against a small model trained for one epoch from ``configs/smoke.yaml`` (pattern
``ksa,full``, time-gap buckets on) on the built-in synthetic data. ``OMP_NUM_THREADS=1`` so that two runs
compute the same floats and outputs can be compared byte for byte. Every row of the fault matrix states
what was expected; the script exits non-zero if any expectation failed (the report still says which).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
UDATA = ROOT.parent / "shared" / "data" / "ml-100k" / "u.data"
CRASH_POINTS = ("before-output", "after-output", "after-commit")


# ---- running the command line ----------------------------------------------------------------------------
@dataclass
class Run:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_error(self) -> str:
        lines = [x for x in self.stderr.strip().splitlines() if x.startswith("ksa-rec")]
        return lines[-1] if lines else ""

    @property
    def counts(self) -> dict[str, int]:
        line = next((x for x in self.stdout.splitlines() if x.startswith("ksa-rec stream: applied")), "")
        return {k: int(v) for k, v in (p.split() for p in line.split(": ", 1)[1].split(", "))} if line else {}


class Cli:
    """``python -m ksa_rec.cli`` in ``work``; logs every command and the tail of its output."""

    def __init__(self, work: Path, log: list[str]):
        self.work, self.log = work, log
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.env.pop("KSA_REC_CRASH_AT", None)

    def args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ksa_rec.cli", *args]

    def __call__(self, *args: str, stdin: str | Path | None = None, env: dict | None = None) -> Run:
        command = self.args(*args)
        feed = open(stdin) if isinstance(stdin, Path) else None
        try:
            done = subprocess.run(command, cwd=self.work, env={**self.env, **(env or {})}, capture_output=True,
                                  text=True, stdin=feed, input=stdin if isinstance(stdin, str) else None,
                                  timeout=900)
        finally:
            if feed:
                feed.close()
        run = Run(command, done.returncode, done.stdout, done.stderr)
        self.record(run, stdin)
        return run

    def record(self, run: Run, stdin=None) -> None:
        shown = " ".join(shlex.quote(a) for a in run.command[2:])
        fed = f" < {stdin if isinstance(stdin, Path) else '(pipe)'}" if stdin is not None else ""
        tail = [x for x in (run.stdout + run.stderr).splitlines() if x.startswith("ksa-rec")][-3:]
        self.log.append(f"$ {shown}{fed}\n  exit {run.returncode}\n" + "".join(f"  {x}\n" for x in tail))


def sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def store_blobs(path: Path) -> dict[str, bytes]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT user_id, state FROM states"))
    finally:
        db.close()


def store_meta(path: Path) -> dict[str, str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT key, value FROM meta"))
    finally:
        db.close()


def states_bit_identical(a: Path, b: Path, model_id: str) -> bool:
    """Same users, and per user the same counters and every tensor equal bit for bit. (Blobs themselves
    are not compared: safetensors writes the metadata keys in no fixed order.)"""
    import torch

    from ksa_rec.serving.state import UserState

    left, right = store_blobs(a), store_blobs(b)
    if left.keys() != right.keys():
        return False
    for user in left:
        x, y = (UserState.from_bytes(blobs[user], model_id, user) for blobs in (left, right))
        tensors = [(x.vector, y.vector), (x.seen, y.seen), (x.recent_ids, y.recent_ids), (x.recent_ts, y.recent_ts)]
        tensors += [(lx[k], ly[k]) for lx, ly in zip(x.layers, y.layers) for k in lx]
        if (x.event_count, x.last_timestamp, x.last_item, len(x.layers)) != \
                (y.event_count, y.last_timestamp, y.last_item, len(y.layers)):
            return False
        if not all(torch.equal(p, q) for p, q in tensors):
            return False
    return True


def events_applied(path: Path, model_id: str) -> int:
    from ksa_rec.serving.state import UserState

    return sum(UserState.from_bytes(b, model_id, u).event_count for u, b in store_blobs(path).items())


def write_jsonl(path: Path, rows: list[dict] | pl.DataFrame) -> Path:
    rows = rows.to_dicts() if isinstance(rows, pl.DataFrame) else rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the model ----------------------------------------------------------------------------------------------
def train(cli: Cli, work: Path) -> tuple[Path, pl.DataFrame]:
    run = cli("fit", "--config", str(ROOT / "configs/smoke.yaml"), "--trainer.max_epochs", "1",
              "--model.encoder.pattern", "ksa,full", "--model.encoder.time_gap_buckets", "16",
              "--trainer.default_root_dir", str(work / "train"), "--trainer.logger", "false",
              "--data.cache_dir", str(work / "cache"))
    if run.returncode:
        raise SystemExit(f"training failed:\n{run.stderr[-3000:]}")
    checkpoint = next((work / "train").rglob("last.ckpt"))
    events = pl.read_parquet(next((work / "cache" / "synthetic").glob("*.parquet")))
    events = events.select("user_id", "item_id", "timestamp", "category")
    return checkpoint, events.sort("timestamp", maintain_order=True)


# ---- fault matrix -------------------------------------------------------------------------------------------
@dataclass
class Fault:
    fault: str
    command: str
    result: str
    guarantee: str
    ok: bool


class Matrix:
    def __init__(self, cli: Cli, work: Path, checkpoint: Path, events: pl.DataFrame, model_id: str):
        self.cli, self.work, self.checkpoint, self.events, self.model_id = cli, work, checkpoint, events, model_id
        self.rows: list[Fault] = []
        self.users = events["user_id"].unique(maintain_order=True)[:6].to_list()
        self.frame = events.filter(pl.col("user_id").is_in(self.users))  # 6 users, time order
        self.all = write_jsonl(work / "events.jsonl", self.frame)

    def stream(self, events, state, *extra, stdin=None, env=None) -> Run:
        return self.cli("stream", "--checkpoint", str(self.checkpoint), "--events", str(events), "--state", str(state),
                        "--accelerator", "cpu", *extra, stdin=stdin, env=env)

    def add(self, fault: str, command: str, result: str, guarantee: str, ok: bool) -> None:
        self.rows.append(Fault(fault, command, result, guarantee, bool(ok)))
        print(f"[{'ok' if ok else 'FAILED'}] {fault}: {result}", flush=True)

    def dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir()
        return path

    def same_states(self, a: Path, b: Path) -> bool:
        """Same users with the same event counts and replay windows (floats may differ in the last bits
        where micro-batches were cut differently)."""
        from ksa_rec.serving.state import UserState

        def summary(path):
            return {u: (s.event_count, s.last_timestamp, s.recent_ids.tolist())
                    for u, s in ((u, UserState.from_bytes(x, self.model_id, u)) for u, x in store_blobs(path).items())}
        return summary(a) == summary(b)

    def run_all(self) -> list[Fault]:
        reference = self.dir("reference")
        self.stream(self.all, reference / "s.db", "--chunk-rows", "32")
        self.reference = reference / "s.db"
        for check in (self.new_content_same_name, self.reread, self.restarted_pipe, self.second_writer,
                      self.existing_jsonl, self.overwrite_then_bad_input, self.spark_directory, self.score_nosuch,
                      self.score_existing_output, self.bad_counts, self.late_event, self.dead_letter, self.udata,
                      self.corrupt_pages, self.nested_value, self.gap_overflow, self.unknown_ids, self.old_store):
            check()
        return self.rows

    def new_content_same_name(self):
        d = self.dir("same-name")
        lines, half = self.frame.to_dicts(), self.frame.height // 2
        write_jsonl(d / "new_events.jsonl", lines[:half])
        first = self.stream(d / "new_events.jsonl", d / "s.db", "--chunk-rows", "32")
        write_jsonl(d / "new_events.jsonl", lines[half:])
        second = self.stream(d / "new_events.jsonl", d / "s.db", "--chunk-rows", "32")
        applied = events_applied(d / "s.db", self.model_id)
        self.add("A new day's events under yesterday's file name",
                 "`stream --events new_events.jsonl` on day 1, then again with new content",
                 f"day 2: {second.counts.get('applied')} of {len(lines) - half} new events applied, "
                 f"{second.counts.get('replayed')} replayed; store holds {applied} of {len(lines)} events, "
                 f"states equal a single run: {self.same_states(d / 's.db', self.reference)}",
                 "progress is per event identity, never per file name or offset",
                 first.returncode == second.returncode == 0 and applied == len(lines)
                 and self.same_states(d / "s.db", self.reference))

    def reread(self):
        d = self.dir("reread")
        self.stream(self.all, d / "s.db")
        before = sha(d / "s.db.outputs.jsonl"), store_blobs(d / "s.db")
        again = self.stream(self.all, d / "s.db")
        same = before == (sha(d / "s.db.outputs.jsonl"), store_blobs(d / "s.db"))
        self.add("The same file read again (a retried job)", "`stream --events events.jsonl` twice",
                 f"second run: applied {again.counts.get('applied')}, replayed {again.counts.get('replayed')}; "
                 f"store and output byte-identical: {same}",
                 "a replay is skipped by identity and counted, never applied twice",
                 again.returncode == 0 and same and again.counts.get("replayed") == self.frame.height)

    def restarted_pipe(self):
        d = self.dir("pipe")
        lines, cut = self.frame.to_dicts(), 300
        text = ["".join(json.dumps(r) + "\n" for r in part) for part in (lines[:cut], lines[cut - 10:])]
        first = self.stream("-", d / "s.db", "--chunk-rows", "64", stdin=text[0])
        second = self.stream("-", d / "s.db", "--chunk-rows", "64", stdin=text[1])
        same = self.same_states(d / "s.db", self.reference)
        self.add("A restarted `tail -f` pipe that replays its last 10 lines",
                 "`... | stream --events -`, killed, restarted on the log from 10 lines back",
                 f"restart: applied {second.counts.get('applied')}, replayed {second.counts.get('replayed')}; "
                 f"states equal a single run: {same}", "no event lost, none applied twice",
                 first.returncode == second.returncode == 0 and second.counts.get("replayed") == 10 and same)

    def second_writer(self):
        d = self.dir("two-writers")
        command = self.cli.args("stream", "--checkpoint", str(self.checkpoint), "--events", "-", "--state",
                                str(d / "s.db"), "--chunk-rows", "32", "--accelerator", "cpu")
        first = subprocess.Popen(command, cwd=self.work, env=self.cli.env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [json.dumps(r) + "\n" for r in self.frame.to_dicts()]
        first.stdin.write("".join(lines[:200]))
        first.stdin.flush()
        lock = d / "s.db.lock"
        deadline = time.monotonic() + 300
        while not (lock.exists() and f"pid {first.pid}," in lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        second = self.stream(self.all, d / "s.db", "--chunk-rows", "32")
        out, err = first.communicate(input="".join(lines[200:]), timeout=600)
        self.cli.record(Run(command, first.returncode, out, err), stdin="(pipe)")
        same = self.same_states(d / "s.db", self.reference)
        self.add("A second `stream` started on a store in use", "two `stream` processes on one `--state`",
                 f"second: exit {second.returncode}, `{_short(second.last_error)}`; first: exit "
                 f"{first.returncode}, states equal a single run: {same}",
                 "one writer per store (flock on `<store>.lock`, dropped by the OS even on kill -9)",
                 second.returncode == 1 and f"pid {first.pid}" in second.last_error and first.returncode == 0 and same)

    def existing_jsonl(self):
        d = self.dir("existing-output")
        (d / "recs.jsonl").write_text("yesterday's recommendations\n")
        before = sha(d / "recs.jsonl")
        run = self.stream(self.all, d / "s.db", "--output", str(d / "recs.jsonl"))
        self.add("`--output` names a file the store did not write", "`stream --output recs.jsonl` (existing)",
                 f"exit {run.returncode}: `{_short(run.last_error)}`; "
                 f"file unchanged: {sha(d / 'recs.jsonl') == before}",
                 "an output is never destroyed without --overwrite",
                 run.returncode == 1 and sha(d / "recs.jsonl") == before)

    def overwrite_then_bad_input(self):
        d = self.dir("overwrite-bad-input")
        (d / "recs.jsonl").write_text("yesterday's recommendations\n")
        before = sha(d / "recs.jsonl")
        bad = write_jsonl(d / "bad.jsonl", [{"user_id": "u", "item_id": "i000001", "timestamp": 9, "category": "c02"},
                                            {"user_id": "u", "item_id": "i000002", "timestamp": 5, "category": "c02"}])
        run = self.stream(bad, d / "s.db", "--output", str(d / "recs.jsonl"), "--overwrite")
        self.add("`--overwrite`, but the input is bad", "`stream --overwrite` on an input with a late event",
                 f"exit {run.returncode}; file unchanged: {sha(d / 'recs.jsonl') == before}",
                 "nothing is truncated before the first micro-batch is admitted",
                 run.returncode == 1 and sha(d / "recs.jsonl") == before)

    def spark_directory(self):
        d = self.dir("spark")
        out = d / "recs.parquet"
        out.mkdir()
        (out / "_SUCCESS").write_text("")
        pl.DataFrame({"x": [1, 2]}).write_parquet(out / "part-00000-3f1c2a.snappy.parquet")
        before = {p.name: sha(p) for p in out.iterdir()}
        refused = self.stream(self.all, d / "s.db", "--output", str(out))
        kept = {p.name: sha(p) for p in out.iterdir()} == before
        done = self.stream(self.all, d / "s.db", "--output", str(out), "--overwrite", "--chunk-rows", "128")
        ours = sorted(p.name for p in out.glob("ksa-rec-part-*.parquet"))
        foreign_kept = all(sha(out / name) == digest for name, digest in before.items())
        self.add("A Spark-style parquet directory as `--output`",
                 "`stream --output recs.parquet` (holds `_SUCCESS`, `part-00000-….snappy.parquet`)",
                 f"without --overwrite: exit {refused.returncode}, files unchanged: {kept}; with --overwrite: exit "
                 f"{done.returncode}, {len(ours)} `ksa-rec-part-*` files added, "
                 f"foreign files unchanged: {foreign_kept}",
                 "only files named `ksa-rec-part-NNNNNNNN.parquet` are ever written or removed",
                 refused.returncode == 1 and kept and done.returncode == 0 and ours and foreign_kept)

    def score_nosuch(self):
        d = self.dir("score-typo")
        run = self.cli("score", "--checkpoint", str(self.checkpoint), "--state", str(d / "nosuch.db"), "--output",
                       str(d / "out.parquet"), "--accelerator", "cpu")
        created = sorted(p.name for p in d.iterdir())
        self.add("A typo in `score --state`", "`score --state nosuch.db`",
                 f"exit {run.returncode}: `{_short(run.last_error)}`; files created: {created or 'none'}",
                 "score opens a store read-only and never creates one", run.returncode == 1 and not created)

    def score_existing_output(self):
        d = self.dir("score-output")
        old = b"last week's scores"
        (d / "scores.parquet").write_bytes(old)
        run = self.cli("score", "--checkpoint", str(self.checkpoint), "--events", str(self.all), "--output",
                       str(d / "scores.parquet"), "--accelerator", "cpu")
        kept = (d / "scores.parquet").read_bytes() == old
        self.add("`score --output` names an existing file", "`score --output scores.parquet` (existing)",
                 f"exit {run.returncode}: `{_short(run.last_error)}`; file unchanged: {kept}",
                 "replaced only with --overwrite, and then atomically (no `.tmp` left on failure)",
                 run.returncode == 1 and kept)

    def bad_counts(self):
        d = self.dir("bad-counts")
        runs = [self.stream(self.all, d / "s.db", "--chunk-rows", v) for v in ("0", "-5")]
        errors = [r.stderr.strip() for r in runs]
        self.add("`--chunk-rows 0` and `--chunk-rows -5`", "`stream --chunk-rows 0` / `-5`",
                 f"exit {runs[0].returncode} / {runs[1].returncode}: `{errors[1]}`",
                 "counts must be positive integers (also --top-k, --batch-size, --item-chunk)",
                 all(r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 for r in runs)
                 and not (d / "s.db").exists())

    def _mixed(self, d: Path) -> Path:
        rows = [json.dumps({"user_id": f"u{i % 3}", "item_id": f"i00000{i % 9}", "timestamp": 10 * i,
                            "category": "c02"}) for i in range(20)]
        rows.insert(2, "{not json}")
        rows.insert(5, json.dumps({"user_id": "u0", "item_id": "i000001", "timestamp": 1, "category": "c02"}))
        rows.insert(8, json.dumps({"user_id": "u1", "item_id": "i000002", "timestamp": 95, "category": ["c02"]}))
        (d / "mixed.jsonl").write_text("".join(r + "\n" for r in rows))
        return d / "mixed.jsonl"

    def late_event(self):
        d = self.dir("late")
        mixed = self._mixed(d)
        strict = self.stream(mixed, d / "s.db", "--chunk-rows", "5")
        skip = self.stream(mixed, d / "s.db", "--chunk-rows", "5", "--on-bad-event", "skip")
        again = self.stream(mixed, d / "s.db", "--chunk-rows", "5", "--on-bad-event", "skip")
        c = skip.counts
        self.add("Malformed rows and a late event (default policy, then `skip`)",
                 "`stream` with and without `--on-bad-event skip`, then restarted",
                 f"default: exit {strict.returncode}, `{_short(strict.last_error)}`; skip: exit {skip.returncode}, "
                 f"applied {c.get('applied')}, late {c.get('late')}, malformed {c.get('malformed')}; restarted: "
                 f"exit {again.returncode}, replayed {again.counts.get('replayed')}",
                 "a bad event never blocks a stream for good; each is counted",
                 strict.returncode == 1 and skip.returncode == 0 and c.get("late") == 1 and c.get("malformed") == 2
                 and again.returncode == 0 and again.counts.get("replayed") == 20)

    def dead_letter(self):
        d = self.dir("dead-letter")
        mixed = self._mixed(d)
        run = self.stream(mixed, d / "s.db", "--on-bad-event", "dead-letter", "--dead-letter", str(d / "dead.jsonl"),
                          "--summary", str(d / "summary.json"))
        records = [json.loads(x) for x in (d / "dead.jsonl").read_text().splitlines()] if run.returncode == 0 else []
        letters = ", ".join(f"{r['row']}: {r['kind']}" for r in records)
        self.add("Bad events to a dead-letter file", "`stream --on-bad-event dead-letter --dead-letter dead.jsonl`",
                 f"exit {run.returncode}; dead letters (row: kind): {letters}; summary written: "
                 f"{(d / 'summary.json').exists()}",
                 "every rejected event is kept with its row, reason and raw text",
                 run.returncode == 0 and sorted(r["row"] for r in records) == [3, 6, 9])

    def udata(self):
        if not UDATA.exists():
            self.add("MovieLens 100K `u.data` as-is", "(u.data not found)", "not run", "", False)
            return
        d = self.dir("udata")
        raw = pl.read_csv(UDATA, separator="\t", has_header=False, new_columns=["user_id", "item_id", "rating",
                                                                                 "timestamp"]).head(5000)
        rows = raw.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), "timestamp",
                          pl.lit(None, dtype=pl.String).alias("category"))
        as_is = write_jsonl(d / "udata.jsonl", rows)
        ordered = write_jsonl(d / "udata-sorted.jsonl", rows.sort("timestamp", maintain_order=True))
        strict = self.stream(as_is, d / "a.db")
        skip = self.stream(as_is, d / "b.db", "--on-bad-event", "skip")
        good = self.stream(ordered, d / "c.db")
        self.add("MovieLens 100K `u.data` in file order (first 5,000 rows, as jsonl)",
                 "`stream` as-is; with `--on-bad-event skip`; sorted by timestamp",
                 f"as-is: exit {strict.returncode} at `{_short(strict.last_error, 90)}`; skip: late "
                 f"{skip.counts.get('late')} of 5000 dropped; sorted: exit {good.returncode}, applied "
                 f"{good.counts.get('applied')}, late {good.counts.get('late')}",
                 "events of a user must arrive in time order: sort such a file first (skip loses the late ones)",
                 strict.returncode == 1 and good.returncode == 0 and good.counts.get("applied") == 5000)

    def corrupt_pages(self):
        d = self.dir("corrupt")
        self.stream(self.all, d / "s.db", "--chunk-rows", "64")
        page = 4096
        size = (d / "s.db").stat().st_size
        with open(d / "s.db", "r+b") as f:
            f.seek(page * (size // page // 2))
            f.write(b"\xa5" * 4 * page)
        run = self.stream(self.all, d / "s.db")
        score = self.cli("score", "--checkpoint", str(self.checkpoint), "--state", str(d / "s.db"), "--output",
                         str(d / "out.parquet"), "--accelerator", "cpu")
        self.add("Corrupt pages in the middle of the state store", "`stream` and `score --state` on it",
                 f"exit {run.returncode} / {score.returncode}: `{_short(run.last_error)}`",
                 "a damaged store is a one-line refusal, never a traceback or a guess",
                 run.returncode == 1 and score.returncode == 1 and "not a usable state store" in run.last_error)

    def nested_value(self):
        d = self.dir("nested")
        bad = write_jsonl(d / "e.jsonl", [{"user_id": "u", "item_id": {"id": 7}, "timestamp": 5, "category": "c02"}])
        run = self.stream(bad, d / "s.db")
        self.add("A nested JSON value", "`stream` on `{\"item_id\": {\"id\": 7}, ...}`",
                 f"exit {run.returncode}: `{_short(run.last_error)}`", "one line naming row and column",
                 run.returncode == 1 and "row 1, column 'item_id': nested JSON value" in run.last_error)

    def gap_overflow(self):
        d = self.dir("gap")
        bad = write_jsonl(d / "e.jsonl", [{"user_id": "u", "item_id": "i000001", "timestamp": -9 * 10**18,
                                           "category": "c02"},
                                          {"user_id": "u", "item_id": "i000002", "timestamp": 9 * 10**18,
                                           "category": "c02"}])
        run = self.stream(bad, d / "s.db")
        self.add("A time gap beyond int64", "`stream` on timestamps -9e18 then 9e18",
                 f"exit {run.returncode}: `{_short(run.last_error)}`", "the real reason, in one line",
                 run.returncode == 1 and "does not fit in int64" in run.last_error)

    def unknown_ids(self):
        d = self.dir("unknown")
        rows = [{"user_id": "new", "item_id": "never-seen", "timestamp": 5, "category": "zzz"},
                {"user_id": "new", "item_id": "i000001", "timestamp": 9, "category": "c02"}]
        path = write_jsonl(d / "e.jsonl", rows)
        oov = self.stream(path, d / "a.db")
        skip = self.stream(path, d / "b.db", "--on-unknown-item", "skip")
        error = self.stream(path, d / "c.db", "--on-unknown-item", "error")
        self.add("Unknown item ids and category values", "`stream --on-unknown-item oov|skip|error`",
                 f"oov: applied {oov.counts.get('applied')}, unknown_items {oov.counts.get('unknown_items')}, "
                 f"unknown_categories {oov.counts.get('unknown_categories')}; skip: applied "
                 f"{skip.counts.get('applied')}; error: exit {error.returncode}",
                 "unknown ids are counted and reported, never silent",
                 oov.counts.get("unknown_items") == 1 and oov.counts.get("unknown_categories") == 1
                 and skip.counts.get("applied") == 1 and error.returncode == 1)

    def old_store(self):
        d = self.dir("old-store")
        db = sqlite3.connect(d / "s.db")
        db.execute("CREATE TABLE states (user_id TEXT PRIMARY KEY, state BLOB NOT NULL)")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('position:/data/events.jsonl', '4096')")
        db.commit()
        db.close()
        run = self.stream(self.all, d / "s.db")
        self.add("A state store of the previous format (v1)", "`stream --state old.db`",
                 f"exit {run.returncode}: `{_short(run.last_error)}`", "refused with how to rebuild it",
                 run.returncode == 1 and "rebuild it" in run.last_error)


def _short(line: str, limit: int = 150) -> str:
    line = re.sub(r"/\S*/", "", line.replace("ksa-rec stream: error: ", "").replace("ksa-rec score: error: ", ""))
    return line if len(line) <= limit else line[:limit - 3] + "..."


# ---- kill -9 at each commit boundary ------------------------------------------------------------------------
def crash_restarts(cli: Cli, work: Path, checkpoint: Path, events: pl.DataFrame, model_id: str,
                   restarts: int) -> dict:
    """A reference run, then ``restarts`` runs each SIGKILLed at a chosen crash point (cycling through
    before-output, after-output, after-commit; the 2nd visit of it), then one run to the end."""
    d = work / "kill9"
    d.mkdir()
    path = write_jsonl(d / "events.jsonl", events.head(800))
    chunk = 16

    def stream(state, env=None):
        return cli("stream", "--checkpoint", str(checkpoint), "--events", str(path), "--state", str(state),
                   "--chunk-rows", str(chunk), "--accelerator", "cpu", env=env)

    reference = stream(d / "ref.db")
    kills = []
    for i in range(restarts):
        point = CRASH_POINTS[i % 3]
        run = stream(d / "crash.db", env={"KSA_REC_CRASH_AT": f"{point}:2"})
        output = d / "crash.db.outputs.jsonl"
        sink = next((int(v) for k, v in store_meta(d / "crash.db").items() if k.startswith("sink:")), 0)
        kills.append({"restart": i + 1, "point": point, "killed": run.returncode == -signal.SIGKILL,
                      "events_committed": events_applied(d / "crash.db", model_id),
                      "output_bytes": output.stat().st_size if output.exists() else 0, "committed_bytes": sink})
        print(f"kill {i + 1}: {kills[-1]}", flush=True)
    final = stream(d / "crash.db")
    outputs_identical = (d / "crash.db.outputs.jsonl").read_bytes() == (d / "ref.db.outputs.jsonl").read_bytes()
    states_identical = states_bit_identical(d / "crash.db", d / "ref.db", model_id)
    return {"events": min(800, events.height), "chunk_rows": chunk, "reference_exit": reference.returncode,
            "final_exit": final.returncode, "final_counts": final.counts, "kills": kills,
            "all_killed": all(k["killed"] for k in kills), "outputs_byte_identical": outputs_identical,
            "states_bit_identical": states_identical,
            "output_sha256": sha(d / "crash.db.outputs.jsonl")}


# ---- soak ---------------------------------------------------------------------------------------------------
def soak(cli: Cli, work: Path, checkpoint: Path, num_events: int, num_users: int) -> dict:
    """``num_events`` synthetic events of ``num_users`` users (items and categories drawn from the
    checkpoint's vocabularies, time-ordered) piped into ``stream --events -``; the process's RSS and
    peak RSS sampled every half second with the events it has processed so far."""
    from ksa_rec.serving.artifact import ServingModel

    serving = ServingModel.load(checkpoint)
    items = serving.items.raw_ids.to_list()
    categories = serving.features["category"].raw_ids.to_list()
    rng = random.Random(0)
    d = work / f"soak-{num_users}"
    d.mkdir()
    path = d / "events.jsonl"
    with path.open("w") as f:
        for i in range(num_events):
            f.write(json.dumps({"user_id": f"soak{rng.randrange(num_users):05d}", "item_id": rng.choice(items),
                                "timestamp": 1_700_000_000 + i, "category": rng.choice(categories)}) + "\n")
    command = cli.args("stream", "--checkpoint", str(checkpoint), "--events", "-", "--state", str(d / "s.db"),
                       "--chunk-rows", "1024", "--accelerator", "cpu")
    started = time.monotonic()
    with path.open() as feed, (d / "stderr.txt").open("w") as errors:
        proc = subprocess.Popen(command, cwd=work, env={**cli.env, "PYTHONUNBUFFERED": "1"}, stdin=feed,
                                stdout=subprocess.PIPE, stderr=errors, text=True)
        progress = {"events": 0}
        out: list[str] = []

        def read_progress():
            # Lightning's bar redraws with \r on stdout; its postfix carries the events processed so far.
            for chunk in iter(lambda: proc.stdout.read(256), ""):
                out.append(chunk)
                # complete postfixes only: a read may end inside one
                found = re.findall(r"events=([\d,]+)[,\]]", "".join(out[-3:]))
                if found:
                    progress["events"] = max(progress["events"], int(found[-1].replace(",", "")))

        reader = threading.Thread(target=read_progress, daemon=True)
        reader.start()
        samples = []
        while proc.poll() is None:
            status = _proc_status(proc.pid)
            if status:
                samples.append({"seconds": round(time.monotonic() - started, 1), "events": progress["events"],
                                "rss_mb": status["VmRSS"], "peak_rss_mb": status["VmHWM"]})
            time.sleep(0.5)
        reader.join(timeout=30)
    run = Run(command, proc.returncode, "".join(out), (d / "stderr.txt").read_text())
    cli.record(run, stdin=path)
    store_bytes = (d / "s.db").stat().st_size
    touched = num_users * (1 - (1 - 1 / num_users) ** 1024)  # expected distinct users in a micro-batch
    return {"events": num_events, "users": num_users, "chunk_rows": 1024, "exit": proc.returncode,
            "seconds": round(time.monotonic() - started, 1), "counts": run.counts,
            "store_mb": round(store_bytes / 2**20, 1), "state_kb_per_user": round(store_bytes / num_users / 1024, 1),
            "users_per_micro_batch": round(touched), "samples": samples}


def _proc_status(pid: int) -> dict[str, float] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    return {k: round(int(v) / 1024, 1) for k, v in values.items()} if len(values) == 2 else None


def soak_table(result: dict, rows: int = 10) -> tuple[list[dict], dict]:
    """``rows`` samples evenly spread over the run, and the highest RSS in its first and last quarters."""
    samples = [s for s in result["samples"] if s["events"] > 0]
    if not samples:
        return [], {}
    picked = [samples[round(i * (len(samples) - 1) / (rows - 1))] for i in range(rows)]
    total = result["events"]
    early = max((s["rss_mb"] for s in samples if s["events"] <= 0.25 * total), default=None)
    late = max((s["rss_mb"] for s in samples if s["events"] >= 0.75 * total), default=None)
    return picked, {"first_quarter_mb": early, "last_quarter_mb": late,
                    "peak_rss_mb": max(s["peak_rss_mb"] for s in samples)}


def soak_section(result: dict) -> list[str]:
    picked, verdict = soak_table(result)
    per_user = result["events"] / result["users"]
    lines = [
        "", f"### {result['users']:,} users, {per_user:.0f} events each on average", "",
        f"Exit {result['exit']} after {result['seconds']} s ({result['events'] / result['seconds']:,.0f} events/s "
        f"including start-up); counts {result['counts']}; store {result['store_mb']} MB at the end, "
        f"{result['state_kb_per_user']} KB per user.", "",
        "| seconds | events processed | RSS (MB) | peak RSS so far (MB) |", "|---|---|---|---|",
    ]
    lines += [f"| {s['seconds']} | {s['events']:,} | {s['rss_mb']} | {s['peak_rss_mb']} |" for s in picked]
    if verdict:
        batch_mb = result["users_per_micro_batch"] * result["state_kb_per_user"] / 1024
        lines += ["", f"Highest RSS during the first quarter of the events: {verdict['first_quarter_mb']} MB; during "
                  f"the last quarter: {verdict['last_quarter_mb']} MB; peak {verdict['peak_rss_mb']} MB. A micro-batch "
                  f"touches about {result['users_per_micro_batch']:,} users, whose stored states total about "
                  f"{batch_mb:.1f} MB at the end of the run (each held as a blob, decoded tensors and stacked "
                  "caches while the batch is computed)."]
    return lines


# ---- report -------------------------------------------------------------------------------------------------
def report(results: dict, raw_name: str) -> str:
    faults, kill, soaks = results["faults"], results["kill9"], results["soaks"]
    lines = [
        "# Reliability of `ksa-rec stream` and `ksa-rec score`", "",
        f"Produced by `pipelines/reliability.py` on {results['date']} ({results['machine']}, torch "
        f"{results['torch']}, Python {results['python']}); raw results in "
        f"[`docs/results/raw/{raw_name}.json`](results/raw/{raw_name}.json), every command and its last output "
        f"lines in [`docs/results/raw/{raw_name}.log`](results/raw/{raw_name}.log). Model: `configs/smoke.yaml` "
        "(pattern `ksa,full`, time-gap buckets) trained one epoch on the built-in synthetic data. Seconds and "
        "events/s below are indicative only: the machine was shared with other jobs.", "",
        "## What `stream` guarantees", "",
        "- **Exactly-once by event identity.** An event's identity is an 8-byte blake2b of its raw item id, "
        "timestamp and feature values (sorted feature order); the user is implicit. Each user state keeps the "
        "identities and timestamps of its newest 128 applied events (`REPLAY_WINDOW`), committed with the rest "
        "of the state in the micro-batch's one transaction. A restarted run reads its input from row 1: an "
        "event already applied is a *replay*, skipped and counted. So a new file under an old name, a retried "
        "job and a restarted pipe are all correct, and the input's name and offsets mean nothing.",
        "- **Classification** of each event against its user's state and the user's earlier events in the same "
        "input: identity remembered → replay (`duplicate` when this run applied the first copy); timestamp ≥ the "
        "last applied one → new (equal: a same-second sibling); timestamp ≤ the oldest remembered one while "
        "older events were forgotten → `beyond_horizon`, *assumed* to be a replay and skipped; otherwise "
        "→ late, a bad event.",
        "- **One writer per store**: an exclusive `flock` on `<store>.lock`, which names the holder (pid, start "
        "time); the OS drops it when the process dies, so `kill -9` leaves no stale lock. `score --state` opens "
        "the store read-only (`mode=ro`) and never creates one.",
        "- **Outputs are never destroyed**: an output the store has no committed position for (or one shorter "
        "than what it committed) is refused unless `--overwrite`; truncation waits for the first admitted "
        "micro-batch; parquet parts are named `ksa-rec-part-NNNNNNNN.parquet` and nothing else in the directory "
        "is touched. `score` replaces its output atomically and removes its temporary file on failure.",
        "- **Bad events have a policy**: `--on-bad-event error` (default: one line naming file, row and column), "
        "`skip`, or `dead-letter --dead-letter FILE`; `--on-unknown-item oov|skip|error`; every run prints its "
        "counts (`--summary FILE` writes them as JSON).", "",
        "Limits, by design: (1) an event older than its user's replay window is assumed to be a replay; a "
        "genuinely new event that old is dropped (counted as `beyond_horizon`). (2) If a user has more than 128 "
        "events at its latest timestamp, a replay of the oldest of them is no longer recognised and is applied "
        "again (a same-second sibling is new). (3) Two different events "
        "share an identity with probability about 2^-64 per pair. (4) The dead-letter file is at-least-once: "
        "reading an input again reports its bad rows again. (5) The lock is a local `flock`: one machine, not a "
        "network file system. (6) Events of one user must arrive in time order (ties in any order).", "",
        "## Fault matrix", "",
        "| # | fault | command | result | guarantee | as expected |", "|---|---|---|---|---|---|",
    ]
    for i, f in enumerate(faults, 1):
        cells = [str(i), f["fault"], f["command"], f["result"], f["guarantee"], "yes" if f["ok"] else "**NO**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    killed = sum(k["killed"] for k in kill["kills"])
    between = [k for k in kill["kills"] if k["point"] == "after-output" and k["output_bytes"] > k["committed_bytes"]]
    lines += [
        "", f"## `kill -9` at each commit boundary, {len(kill['kills'])} restarts", "",
        f"{kill['events']} events, `--chunk-rows {kill['chunk_rows']}`. Each restart is SIGKILLed by "
        "`KSA_REC_CRASH_AT=<point>:2` (`ksa_rec/serving/faults.py`), cycling through the three points of a "
        "micro-batch: `before-output` (computed, nothing written), `after-output` (recommendations written, "
        "states not committed) and `after-commit`. Then one run finishes the input.", "",
        f"- kills that landed: {killed} of {len(kill['kills'])}; of the `after-output` kills, {len(between)} left "
        "output bytes beyond the committed length (cut back by the next run)",
        f"- final run: exit {kill['final_exit']}, counts {kill['final_counts']}",
        f"- output byte-identical to an uninterrupted run: **{kill['outputs_byte_identical']}** "
        f"(sha256 `{kill['output_sha256'][:16]}…`)",
        f"- states identical to an uninterrupted run (every tensor bit for bit, every counter): "
        f"**{kill['states_bit_identical']}**", "",
        "| restart | killed at | killed | events committed | output bytes | committed output bytes |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {k['restart']} | `{k['point']}` | {k['killed']} | {k['events_committed']} | {k['output_bytes']} | "
              f"{k['committed_bytes']} |" for k in kill["kills"]]
    lines += [
        "", "## Soak", "",
        "Synthetic events (items and categories drawn from the checkpoint's vocabularies, users drawn at random, "
        "one event per second) piped into `stream --events -` with `--chunk-rows 1024`; the writer's RSS and peak "
        "RSS sampled every 0.5 s from `/proc`, with the events processed so far (from the progress bar). A stdin "
        "stream holds one micro-batch, the states of its users and a per-run table of the users it has seen (one "
        "integer each); nothing else grows with the number of events. A user's state does grow with that user's "
        "history where a layer keeps every event (`full` layers, and the seen-items set), so a run with longer "
        "histories per user moves larger states per micro-batch. (A *file* input is read and validated "
        "whole first, so its memory grows with the file: pipe long logs through stdin.)",
    ]
    for result in soaks:
        lines += soak_section(result)
    lines += ["", "Regenerate: `PYTHONPATH=. python pipelines/reliability.py --date YYYY-MM-DD --machine \"...\"`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--machine", default=platform.processor() or platform.machine())
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--raw-dir", type=Path, default=ROOT / "docs" / "results" / "raw")
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--soak-events", type=int, default=100_000)
    parser.add_argument("--soak-users", type=int, nargs="+", default=[20_000, 2_000],
                        help="one soak per value: that many users share the events")
    parser.add_argument("--quick", action="store_true", help="10 restarts and 20,000-event soaks")
    parser.add_argument("--from-raw", type=Path, default=None,
                        help="only render the report again from a raw results JSON of an earlier run")
    args = parser.parse_args()
    if args.from_raw:
        args.report.write_text(report(json.loads(args.from_raw.read_text()), args.from_raw.stem))
        print(f"report: {args.report}")
        return 0
    if args.quick:
        args.restarts, args.soak_events = 10, 20_000
    import torch

    from ksa_rec.serving.artifact import ServingModel

    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ksa-rec-reliability-") as tmp:
        work = Path(tmp)
        cli = Cli(work, log)
        checkpoint, events = train(cli, work)
        model_id = ServingModel.load(checkpoint).model_id
        faults = Matrix(cli, work, checkpoint, events, model_id).run_all()
        kill = crash_restarts(cli, work, checkpoint, events, model_id, args.restarts)
        soaks = [soak(cli, work, checkpoint, args.soak_events, users) for users in args.soak_users]
    results = {"date": args.date, "machine": args.machine, "torch": torch.__version__,
               "python": platform.python_version(), "faults": [asdict(f) for f in faults], "kill9": kill,
               "soaks": soaks}
    raw_name = f"reliability-{args.date}"
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    (args.raw_dir / f"{raw_name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.raw_dir / f"{raw_name}.log").write_text("\n".join(log))
    args.report.write_text(report(results, raw_name))
    print(f"report: {args.report}")
    failed = [f.fault for f in faults if not f.ok]
    if not (kill["all_killed"] and kill["outputs_byte_identical"] and kill["states_bit_identical"]) \
            or any(result["exit"] != 0 for result in soaks):
        failed.append("kill -9 restarts / soak")
    if failed:
        print("NOT as expected: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
