"""``ksa-rec stream`` and ``ksa-rec score`` end to end: parity, resumption, exactly-once under SIGKILL,
and bad input that changes nothing."""

import json
import os
import signal
import sqlite3
import subprocess
import sys

import polars as pl
import pytest
import torch
from stream_checks import (
    assert_same_outputs,
    assert_same_store,
    assert_same_topk,
    event_counts,
    last_records,
    store_dump,
    stream_then_score,
)
from stream_checks import stream as _stream

from ksa_rec.cli import main as ksa_rec
from ksa_rec.data.schema import RESERVED_IDS
from ksa_rec.ops import backend as backend_module
from ksa_rec.serving.artifact import ServingModel
from ksa_rec.serving.faults import CRASH_ENV
from ksa_rec.serving.state import UserState


def test_stream_then_topk_equals_score(trained, event_files, tmp_path):
    checkpoint, _ = trained
    events, frame = event_files
    streamed, scored = stream_then_score(checkpoint, events, tmp_path, "--chunk-rows", "37")
    assert scored.height == frame["user_id"].n_unique()
    assert_same_topk(streamed, scored)
    # score also reads the store the stream built: same top-K again
    assert ksa_rec(["score", "--checkpoint", str(checkpoint), "--state", str(tmp_path / "s.db"), "--output",
                    str(tmp_path / "from_store.parquet"), "--accelerator", "cpu"]) == 0
    from_store = pl.read_parquet(tmp_path / "from_store.parquet").sort("user_id")
    assert from_store["item_ids"].to_list() == scored.sort("user_id")["item_ids"].to_list()


def test_a_cosine_head_streams_and_scores_by_cosine(trained_cosine, event_files, tmp_path):
    """stream and score rank with the model's head: each listed score is the cosine of the user's state
    vector and the item's row, in falling order, and streaming equals scoring."""
    events, _ = event_files
    streamed, scored = stream_then_score(trained_cosine, events, tmp_path, "--chunk-rows", "23")
    assert_same_topk(streamed, scored)
    serving = ServingModel.load(trained_cosine)
    table = torch.nn.functional.normalize(serving.model.item_weight.detach(), dim=-1)
    row_of = {raw: i + RESERVED_IDS for i, raw in enumerate(serving.items.raw_ids)}
    states, _ = store_dump(tmp_path / "s.db")
    for user, blob in states.items():
        vector = torch.nn.functional.normalize(UserState.from_bytes(blob, serving.model_id, user).vector, dim=-1)
        record = streamed[user]
        want = table[[row_of[item] for item in record["item_ids"]]] @ vector
        assert torch.allclose(torch.tensor(record["scores"]), want, atol=1e-5)
        assert record["scores"] == sorted(record["scores"], reverse=True)


@pytest.mark.slow
def test_memory_layers_stream_like_they_score(trained_mka, event_files, tmp_path):
    events, _ = event_files
    assert_same_topk(*stream_then_score(trained_mka, events, tmp_path, "--chunk-rows", "29"))


@pytest.mark.slow
def test_hstu_layers_stream_like_they_score(trained_hstu, event_files, tmp_path):
    """hstu layers keep every earlier event's K/V in the stored state; streamed in pieces, the top-K equals
    scoring the whole histories."""
    events, _ = event_files
    assert_same_topk(*stream_then_score(trained_hstu, events, tmp_path, "--chunk-rows", "13"))


@pytest.mark.slow
def test_chunk_seeded_summaries_stream_like_they_score(trained_chunk, event_files, tmp_path):
    """The state keeps the open chunk's event inputs (one more entry per user) and builds each summary when
    its chunk completes: streamed one event at a time, the top-K equals scoring the whole histories."""
    events, _ = event_files
    assert_same_topk(*stream_then_score(trained_chunk, events, tmp_path, "--chunk-rows", "1"))
    serving = ServingModel.load(trained_chunk)
    states, _ = store_dump(tmp_path / "s.db")
    for user, blob in states.items():
        state = UserState.from_bytes(blob, serving.model_id, user)
        assert len(state.layers) == 3 and state.layers[2]["x"].shape[0] == state.event_count % 4  # k = 4 (smoke)


@pytest.mark.slow
def test_event_by_event_equals_big_batches(trained, event_files, tmp_path):
    checkpoint, _ = trained
    events, _ = event_files
    assert _stream(checkpoint, events, tmp_path / "one.db", "--chunk-rows", "1") == 0
    assert _stream(checkpoint, events, tmp_path / "big.db", "--chunk-rows", "500") == 0
    serving = ServingModel.load(checkpoint)
    one, _ = store_dump(tmp_path / "one.db")
    big, _ = store_dump(tmp_path / "big.db")
    assert one.keys() == big.keys()
    for user in one:
        a = UserState.from_bytes(one[user], serving.model_id, user)
        b = UserState.from_bytes(big[user], serving.model_id, user)
        assert a.event_count == b.event_count and torch.equal(a.seen, b.seen)
        torch.testing.assert_close(a.vector, b.vector, atol=1e-4, rtol=1e-4)
        for la, lb in zip(a.layers, b.layers):
            assert torch.equal(la["idx"], lb["idx"]) and torch.equal(la["sidx"], lb["sidx"])
            torch.testing.assert_close(la["k"], lb["k"], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(la["sv"], lb["sv"], atol=1e-4, rtol=1e-4)


def test_resume_after_a_completed_run_does_nothing(trained, event_files, tmp_path):
    checkpoint, _ = trained
    events, frame = event_files
    assert _stream(checkpoint, events, tmp_path / "s.db") == 0
    before = store_dump(tmp_path / "s.db"), (tmp_path / "s.db.outputs.jsonl").read_bytes()
    assert _stream(checkpoint, events, tmp_path / "s.db", "--summary", str(tmp_path / "summary.json")) == 0
    assert (store_dump(tmp_path / "s.db"), (tmp_path / "s.db.outputs.jsonl").read_bytes()) == before
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["applied"], summary["replayed"], summary["users"]) == (0, frame.height, 0)


@pytest.mark.slow
def test_stdin_jsonl_and_parquet_sink(trained, event_files, tmp_path):
    checkpoint, _ = trained
    events, frame = event_files
    args = [sys.executable, "-m", "ksa_rec.cli", "stream", "--checkpoint", str(checkpoint), "--events", "-",
            "--state", str(tmp_path / "s.db"), "--output", str(tmp_path / "out.parquet"), "--chunk-rows", "100",
            "--accelerator", "cpu"]
    done = subprocess.run(args, input=events.read_text(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    parts = pl.read_parquet(tmp_path / "out.parquet")
    assert parts.height >= frame["user_id"].n_unique() and parts["row"].max() == frame.height


def test_unknown_items_and_new_users(trained, tmp_path):
    checkpoint, _ = trained
    path = tmp_path / "new.jsonl"
    path.write_text('{"user_id": "brand-new", "item_id": "never-seen", "timestamp": 5, "category": "zzz"}\n'
                    '{"user_id": "brand-new", "item_id": "i000001", "timestamp": 9, "category": "c0001"}\n')
    assert _stream(checkpoint, path, tmp_path / "s.db", "--summary", str(tmp_path / "summary.json")) == 0
    record = last_records(tmp_path / "s.db.outputs.jsonl")["brand-new"]
    assert record["event_count"] == 2 and len(record["item_ids"]) == 10 and "i000001" not in record["item_ids"]
    summary = json.loads((tmp_path / "summary.json").read_text())  # both categories are unknown too
    assert (summary["applied"], summary["unknown_items"], summary["unknown_categories"]) == (2, 1, 2)


BAD_INPUTS = [
    ("malformed", '{"user_id": "u1", "item_id": "a", "timestamp": 5, "category": "c"}\n{not json}\n',
     "bad.jsonl: row 2: not a JSON object"),
    ("missing-column", '{"user_id": "u1", "item_id": "a", "category": "c"}\n', "column 'timestamp'"),
    ("nan", '{"user_id": "u1", "item_id": "a", "timestamp": NaN, "category": "c"}\n',
     "bad.jsonl: row 1"),
    ("time-order", '{"user_id": "u1", "item_id": "a", "timestamp": 50, "category": "c"}\n'
                   '{"user_id": "u1", "item_id": "b", "timestamp": 40, "category": "c"}\n',
     "bad.jsonl: row 2, column 'timestamp': timestamp 40 is before the user's previous event (50)"),
    ("nested", '{"user_id": "u1", "item_id": "a", "timestamp": 5, "category": "c"}\n'
               '{"user_id": "u1", "item_id": "a", "timestamp": 6, "category": ["c", "d"]}\n',
     "bad.jsonl: row 2, column 'category': nested JSON value '[\"c\", \"d\"]'; expected a string or number"),
    ("gap-overflow", '{"user_id": "u1", "item_id": "a", "timestamp": -9000000000000000000, "category": "c"}\n'
                     '{"user_id": "u1", "item_id": "b", "timestamp": 9000000000000000000, "category": "c"}\n',
     "bad.jsonl: row 2, column 'timestamp': the time gap from the user's previous event (-9000000000000000000) "
     "to 9000000000000000000 does not fit in int64"),
]


@pytest.mark.parametrize("text, message", [(t, m) for _, t, m in BAD_INPUTS], ids=[i for i, _, _ in BAD_INPUTS])
def test_bad_input_fails_in_one_line_and_changes_nothing(trained, event_files, tmp_path, capsys, text, message):
    checkpoint, _ = trained
    events, _ = event_files
    assert _stream(checkpoint, events, tmp_path / "s.db") == 0
    before = store_dump(tmp_path / "s.db"), (tmp_path / "s.db.outputs.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    capsys.readouterr()
    assert _stream(checkpoint, bad, tmp_path / "s.db") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ksa-rec stream: error: ") and message in err, err
    assert (store_dump(tmp_path / "s.db"), (tmp_path / "s.db.outputs.jsonl").read_bytes()) == before


def test_failing_batch_keeps_the_earlier_batches(trained, tmp_path):
    checkpoint, _ = trained
    good = [f'{{"user_id": "u{i % 3}", "item_id": "i00000{i % 9}", "timestamp": {10 * i}, "category": "c"}}'
            for i in range(20)]
    bad = '{"user_id": "u0", "item_id": "i000001", "timestamp": 1, "category": "c"}'  # older than u0's last
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(good + [bad]) + "\n")
    assert _stream(checkpoint, path, tmp_path / "s.db", "--chunk-rows", "7") == 1
    # batches [1-7] and [8-14] committed; [15-21] held the bad row
    assert sum(event_counts(checkpoint, tmp_path / "s.db").values()) == 14


def test_corrupt_state_and_foreign_checkpoint(trained, event_files, tmp_path, capsys):
    checkpoint, _ = trained
    events, _ = event_files
    assert _stream(checkpoint, events, tmp_path / "s.db") == 0
    # Another checkpoint (same config, other weights) is refused before anything runs.
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    name = next(k for k in raw["state_dict"] if k.endswith("qkv.weight"))
    raw["state_dict"][name] = raw["state_dict"][name] + 1.0
    other = tmp_path / "other.ckpt"
    torch.save(raw, other)
    before = store_dump(tmp_path / "s.db")
    assert _stream(other, events, tmp_path / "s.db") == 1
    assert "the state store was built by model" in capsys.readouterr().err
    # A corrupt blob: the batch touching that user fails, nothing changes.
    db = sqlite3.connect(tmp_path / "s.db")
    user = next(iter(before[0]))
    db.execute("UPDATE states SET state = ? WHERE user_id = ?", (b"\x00" * 40, user))
    db.commit()
    corrupted = store_dump(tmp_path / "s.db")
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"user_id": user, "item_id": "i000002", "timestamp": 10**12, "category": "c"}) + "\n")
    assert _stream(checkpoint, more, tmp_path / "s.db") == 1
    assert f"user '{user}': corrupt state blob" in capsys.readouterr().err
    assert store_dump(tmp_path / "s.db") == corrupted
    # A corrupt checkpoint file.
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    assert _stream(broken, events, tmp_path / "s.db") == 1
    assert "broken.ckpt: not a readable checkpoint" in capsys.readouterr().err


# (point, n): each run is killed the n-th time it reaches the point (ksa_rec.serving.faults); the next run
# resumes from what was committed. Every point is hit, one between the output write and the commit.
CRASHES = [("after-output", 5), ("after-commit", 9), ("before-output", 4), ("after-output", 1), ("after-commit", 1)]


@pytest.mark.slow
def test_sigkill_at_chosen_points_then_restart_is_exactly_once(trained, tmp_path):
    checkpoint, events_all = trained
    frame = events_all.head(600).sort("timestamp", maintain_order=True)
    events = tmp_path / "events.jsonl"
    frame.write_ndjson(events)
    chunk_rows = 8
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop(CRASH_ENV, None)

    def command(state):
        return [sys.executable, "-m", "ksa_rec.cli", "stream", "--checkpoint", str(checkpoint), "--events",
                str(events), "--state", str(state), "--chunk-rows", str(chunk_rows), "--accelerator", "cpu"]

    reference = subprocess.run(command(tmp_path / "ref.db"), env=env, capture_output=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    crash_db, outputs = tmp_path / "crash.db", tmp_path / "crash.db.outputs.jsonl"
    committed = 0  # micro-batches committed so far
    for point, n in CRASHES:
        run = subprocess.run(command(crash_db), env={**env, CRASH_ENV: f"{point}:{n}"}, capture_output=True,
                             timeout=600)
        assert run.returncode == -signal.SIGKILL, (point, n, run.returncode, run.stderr[-2000:])
        committed += n if point == "after-commit" else n - 1
        assert sum(event_counts(checkpoint, crash_db).values()) == committed * chunk_rows
        _, meta = store_dump(crash_db)
        sink_length = next(int(v) for k, v in meta.items() if k.startswith("sink:"))
        # Killed between the output write and the commit: the output holds records the store does not count.
        assert (outputs.stat().st_size > sink_length) == (point == "after-output")
    assert subprocess.run(command(crash_db), env=env, timeout=600).returncode == 0
    assert_same_store(checkpoint, crash_db, tmp_path / "ref.db")
    assert_same_outputs(outputs, tmp_path / "ref.db.outputs.jsonl")


@pytest.mark.slow
def test_score_on_two_processes_equals_one(trained, event_files, tmp_path):
    """Users split across 2 processes (Lightning DDP on CPU, gloo), parts merged by rank 0: the same
    rows as one process, from events and from a state store, and no part file left behind."""
    checkpoint, _ = trained
    events, _ = event_files
    assert _stream(checkpoint, events, tmp_path / "s.db", "--chunk-rows", "64") == 0
    for source in (["--events", str(events)], ["--state", str(tmp_path / "s.db"), "--batch-size", "3"]):
        outputs = {}
        for devices in (1, 2):
            out = tmp_path / f"scores-{devices}.parquet"
            done = subprocess.run([sys.executable, "-m", "ksa_rec.cli", "score", "--checkpoint", str(checkpoint),
                                   *source, "--output", str(out), "--overwrite", "--accelerator", "cpu",
                                   "--devices", str(devices)],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            assert ("GLOBAL_RANK: 1" in done.stderr) == (devices == 2)
            assert done.stdout.count("written to") == 1
            outputs[devices] = pl.read_parquet(out).sort("user_id")
        one, two = outputs[1], outputs[2]
        assert two.height == one.height > 1 and two["user_id"].n_unique() == two.height
        assert two["user_id"].to_list() == one["user_id"].to_list()
        assert two["item_ids"].to_list() == one["item_ids"].to_list()
        assert two["event_count"].to_list() == one["event_count"].to_list()
        assert sorted(p.name for p in tmp_path.glob("scores-*")) == ["scores-1.parquet", "scores-2.parquet"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stream_runs_the_step_on_the_backend_asked_for(trained, event_files, tmp_path, caplog, backend):
    """``--model.encoder.attention_backend`` reaches the streaming step (it used to run Triton on any CUDA
    device whatever the setting). On this CPU the Triton kernel runs under the interpreter (conftest)."""
    checkpoint, _ = trained
    events, _ = event_files
    backend_module._log_once.cache_clear()
    with caplog.at_level("DEBUG", logger="ksa_rec.ops.backend"):
        assert _stream(checkpoint, events, tmp_path / "s.db", "--chunk-rows", "200",
                       "--model.encoder.attention_backend", backend) == 0
    decisions = {r.getMessage() for r in caplog.records if r.name == "ksa_rec.ops.backend"}
    # the attention decisions (the norms have their own, ``norm on cpu: ...``)
    attention = {d for d in decisions if "attention" in d}
    assert attention == {f"step attention on cpu: backend {backend} (requested {backend})"}
    assert "norm on cpu: backend torch (requested auto)" in decisions
    # the backend is how the model runs, not what it is: the store keeps the checkpoint's model id
    _, meta = store_dump(tmp_path / "s.db")
    assert meta["model_id"] == ServingModel.load(checkpoint).model_id


@pytest.mark.parametrize("checkpoint_of", ["trained", "trained_chunk"])
def test_the_fixed_capacity_step_streams_like_the_jagged_one(checkpoint_of, event_files, tmp_path, request):
    """``--step fixed`` (what ``--step graphed`` replays on CUDA, without the graph): micro-batches of one event
    per user go through fixed-capacity buffers and back to the stored per-user form, the others through the jagged
    step. Both micro-batch sizes (every batch one event; batches where users have several) give the jagged step's
    store and outputs; with chunk-seeded summaries too (the open chunk's inputs travel through the buffers)."""
    checkpoint = request.getfixturevalue(checkpoint_of)
    checkpoint = checkpoint[0] if isinstance(checkpoint, tuple) else checkpoint
    events, _ = event_files
    for rows in ("1", "5"):
        jagged, fixed = tmp_path / f"jagged-{rows}.db", tmp_path / f"fixed-{rows}.db"
        assert _stream(checkpoint, events, jagged, "--chunk-rows", rows) == 0
        assert _stream(checkpoint, events, fixed, "--chunk-rows", rows, "--step", "fixed") == 0
        assert_same_store(checkpoint, fixed, jagged)
        assert_same_outputs(*(path.with_name(path.name + ".outputs.jsonl") for path in (fixed, jagged)))


def test_a_step_the_model_or_machine_cannot_run_is_refused(trained, trained_mka, event_files, tmp_path, capsys):
    events, _ = event_files
    assert _stream(trained[0], events, tmp_path / "a.db", "--step", "graphed") != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--step graphed needs a CUDA device; the model is "
                                                                     "on cpu")
    assert _stream(trained_mka, events, tmp_path / "b.db", "--step", "fixed") != 0
    assert "mka layers have no fixed-capacity step" in capsys.readouterr().err
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "b.db").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpoint_of", ["trained", "trained_chunk"])
def test_graphed_steps_stream_like_the_jagged_one_on_a_gpu(checkpoint_of, event_files, tmp_path, request):
    """``--step graphed``: one-event micro-batches replayed from CUDA graphs (users padded to a bucket, each
    micro-batch's states copied in and out) give the jagged step's store and outputs."""
    checkpoint = request.getfixturevalue(checkpoint_of)
    checkpoint = checkpoint[0] if isinstance(checkpoint, tuple) else checkpoint
    events, _ = event_files
    for rows in ("1", "5"):
        jagged, graphed = tmp_path / f"jagged-{rows}.db", tmp_path / f"graphed-{rows}.db"
        assert _stream(checkpoint, events, jagged, "--chunk-rows", rows, "--accelerator", "gpu") == 0
        assert _stream(checkpoint, events, graphed, "--chunk-rows", rows, "--accelerator", "gpu", "--step",
                       "graphed") == 0
        assert_same_store(checkpoint, graphed, jagged, tol=1e-4)
        assert_same_outputs(*(path.with_name(path.name + ".outputs.jsonl") for path in (graphed, jagged)))
