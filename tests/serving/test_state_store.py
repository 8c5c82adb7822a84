"""User-state blobs and the SQLite store."""

import os
import sqlite3

import pytest
import torch
from safetensors.torch import save as st_save

from ksa_rec.errors import StateError
from ksa_rec.serving.state import STATE_FORMAT, UserState
from ksa_rec.serving.store import FORMAT_KEY, STORE_FORMAT, SqliteStateStore


def _state():
    layer = {"k": torch.randn(3, 2, 4), "v": torch.randn(3, 2, 4), "idx": torch.tensor([5, 6, 7]),
             "sk": torch.randn(1, 2, 4), "sv": torch.randn(1, 2, 4), "sidx": torch.tensor([0])}
    return UserState(8, 1234, 17, torch.randn(8), torch.tensor([2, 5, 17]), [layer, layer],
                     torch.tensor([-3, 2**62, 9]), torch.tensor([1200, 1234, 1234]))


def test_round_trip_is_exact():
    state = _state()
    back = UserState.from_bytes(state.to_bytes("m1"), "m1", "u")
    assert (back.event_count, back.last_timestamp, back.last_item) == (8, 1234, 17)
    assert torch.equal(back.vector, state.vector) and torch.equal(back.seen, state.seen)
    assert torch.equal(back.recent_ids, state.recent_ids) and torch.equal(back.recent_ts, state.recent_ts)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(back.layers, state.layers) for k in a)


def test_empty_tensors_with_stride_zero_encode():
    """A user whose only events are unknown items has an empty seen set, built by ``torch.from_numpy`` of
    an empty ``np.union1d``: stride 0, which a byte view refuses (the service answered 500 to it)."""
    import numpy as np

    seen = torch.from_numpy(np.union1d(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
    state = _state()
    state.seen = seen
    back = UserState.from_bytes(state.to_bytes("m1"), "m1", "u")
    assert back.seen.shape == (0,) and back.seen.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blob_is_laid_out_as_safetensors_save_lays_it_out(dtype):
    """``to_bytes`` writes the safetensors file itself (faster); same header entries and the same data bytes
    as ``safetensors.torch.save``, also for cached rows that are slices of a batch tensor."""
    import json
    import struct

    batch = torch.randn(5, 2, 4)
    state = _state().cast(dtype)
    state.layers[0] = {**state.layers[0], "k": batch[1:4].to(dtype), "v": batch[:, :, ::2][2:5].to(dtype)}
    ours = state.to_bytes("m1")
    tensors = {"vector": state.vector, "seen": state.seen, "recent_ids": state.recent_ids,
               "recent_ts": state.recent_ts}
    for i, layer in enumerate(state.layers):
        tensors.update({f"l{i}.{k}": v.clone() for k, v in layer.items()})
    meta = {"format": STATE_FORMAT, "version": "2", "model_id": "m1", "event_count": "8",
            "last_timestamp": "1234", "last_item": "17", "layers": "2"}
    theirs = st_save({k: v.contiguous().clone() for k, v in tensors.items()}, metadata=meta)

    def split(blob):
        (n,) = struct.unpack("<Q", blob[:8])
        return n, json.loads(blob[8:8 + n]), blob[8 + n:]

    assert split(ours) == split(theirs)
    back = UserState.from_bytes(ours, "m1", "u")
    assert torch.equal(back.layers[0]["v"], state.layers[0]["v"]) and back.vector.dtype == dtype


def test_a_v1_state_asks_for_a_rebuild():
    blob = st_save({"vector": torch.zeros(2)}, metadata={"format": STATE_FORMAT, "version": "1", "model_id": "m1"})
    with pytest.raises(StateError, match="^user 'u': state is a v1 user state, .* rebuild the store") as err:
        UserState.from_bytes(blob, "m1", "u")
    assert "\n" not in str(err.value)


def test_state_of_another_model_is_refused():
    with pytest.raises(StateError, match="user 'u': state was built by model 'm1', not by this checkpoint"):
        UserState.from_bytes(_state().to_bytes("m1"), "m2", "u")


@pytest.mark.parametrize("blob", [b"", b"garbage", b"\xff" * 8 + b"{}", None])
def test_corrupt_blobs_are_one_line_errors(blob):
    blob = blob if blob is not None else _state().to_bytes("m1")[:-20]  # truncated tensor data
    with pytest.raises(StateError, match="^user 'u': ") as err:
        UserState.from_bytes(blob, "m1", "u")
    assert "\n" not in str(err.value)


def test_store_commit_is_atomic(tmp_path):
    store = SqliteStateStore(tmp_path / "s.db")
    store.commit({"a": b"1", "b": b"2"}, {"position": "2"})

    class Boom(dict):
        def items(self):
            yield "a", b"changed"
            raise RuntimeError("killed mid-commit")

    with pytest.raises(RuntimeError):
        store.commit(Boom(), {"position": "3"})
    assert store.get_many(["a", "b", "c"]) == {"a": b"1", "b": b"2"}
    assert store.meta() == {FORMAT_KEY: STORE_FORMAT, "position": "2"}
    assert [rows for rows in store.scan(1)] == [[("a", b"1")], [("b", b"2")]]


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    bad = tmp_path / "s.db"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StateError, match="not a usable state store"):
        SqliteStateStore(bad).meta()


def test_wal_mode(tmp_path):
    SqliteStateStore(tmp_path / "s.db").commit({"a": b"1"}, {})
    assert sqlite3.connect(tmp_path / "s.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_one_writer_per_store_and_readers_go_on(tmp_path):
    first = SqliteStateStore(tmp_path / "s.db")
    first.commit({"a": b"1"}, {})
    with pytest.raises(StateError, match=rf"s.db: another ksa-rec stream or serve is writing to this store "
                                         rf"\(pid {os.getpid()}, started [-0-9: ]+\); one writer per store$"):
        SqliteStateStore(tmp_path / "s.db")
    reader = SqliteStateStore(tmp_path / "s.db", read_only=True)
    assert reader.get_many(["a"]) == {"a": b"1"}
    first.close()
    second = SqliteStateStore(tmp_path / "s.db")  # the lock went with the first writer
    second.commit({"b": b"2"}, {})
    second.close()
    assert dict(reader.scan(10).__next__()) == {"a": b"1", "b": b"2"}
    reader.close()


def test_read_only_opens_only_an_existing_store(tmp_path):
    with pytest.raises(StateError, match="nosuch.db: no such state store$"):
        SqliteStateStore(tmp_path / "nosuch.db", read_only=True)
    assert not (tmp_path / "nosuch.db").exists()
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    with pytest.raises(StateError, match="other.db: not a ksa-rec state store \\(tables: t\\)"):
        SqliteStateStore(other, read_only=True)
    with pytest.raises(StateError, match="other.db: not a ksa-rec state store"):  # nor written into
        SqliteStateStore(other)
    reader = SqliteStateStore(_filled(tmp_path / "s.db", 3), read_only=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.db.execute("DELETE FROM states")
    reader.close()


def test_a_store_of_the_previous_format_asks_for_a_rebuild(tmp_path):
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE states (user_id TEXT PRIMARY KEY, state BLOB NOT NULL)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('position:/x/events.jsonl', '40')")
    db.commit()
    with pytest.raises(StateError, match="old.db: state store format 'v1', .*rebuild it"):
        SqliteStateStore(old)


def _filled(path, users: int):
    store = SqliteStateStore(path)
    store.commit({f"user{i:04d}": os.urandom(3000) for i in range(users)}, {})
    store.close()
    return path


def test_corrupt_pages_deep_in_the_file_are_one_line_errors(tmp_path):
    path = _filled(tmp_path / "s.db", 200)
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    pages = path.stat().st_size // page
    with open(path, "r+b") as f:  # garbage over 4 pages mid-file: the store still opens
        f.seek(page * (pages // 2))
        f.write(b"\xa5" * 4 * page)
    users = [f"user{i:04d}" for i in range(200)]
    message = r"s.db: not a usable state store \(database disk image is malformed\); restore it from a backup"
    for read_only in (True, False):
        store = SqliteStateStore(path, read_only=read_only)
        with pytest.raises(StateError, match=message):
            store.get_many(users)
        with pytest.raises(StateError, match=message):
            list(store.scan(50))
        store.close()


def test_a_bf16_state_keeps_ids_exact_and_halves_float_bytes():
    state = _state()
    half = UserState.from_bytes(state.cast(torch.bfloat16).to_bytes("m1"), "m1", "u")
    assert half.vector.dtype == torch.bfloat16 and half.layers[0]["k"].dtype == torch.bfloat16
    assert torch.equal(half.layers[0]["idx"], state.layers[0]["idx"]) and torch.equal(half.seen, state.seen)
    assert torch.equal(half.recent_ids, state.recent_ids)
    floats = sum(t.numel() * t.element_size() for layer in state.layers for k, t in layer.items() if "idx" not in k)
    assert state.num_bytes - half.num_bytes == floats // 2
    torch.testing.assert_close(half.vector.float(), state.vector, atol=0.02, rtol=0.01)


def test_stream_with_bf16_states(trained, event_files, tmp_path):
    from stream_checks import last_records, store_dump, stream

    from ksa_rec.serving.artifact import ServingModel

    checkpoint, _ = trained
    events, _ = event_files
    for dtype in ("fp32", "bf16"):
        assert stream(checkpoint, events, tmp_path / f"{dtype}.db", "--state-dtype", dtype) == 0
    model_id = ServingModel.load(checkpoint).model_id
    full, half = (store_dump(tmp_path / f"{d}.db")[0] for d in ("fp32", "bf16"))
    assert sum(map(len, half.values())) < 0.7 * sum(map(len, full.values()))
    assert all(UserState.from_bytes(b, model_id, u).vector.dtype == torch.bfloat16 for u, b in half.items())
    got, want = (last_records(tmp_path / f"{d}.db.outputs.jsonl") for d in ("bf16", "fp32"))
    overlap = [len(set(got[u]["item_ids"]) & set(want[u]["item_ids"])) / len(want[u]["item_ids"]) for u in want]
    assert sum(overlap) / len(overlap) >= 0.8  # measured on the smoke model: docs/results/serving.md
