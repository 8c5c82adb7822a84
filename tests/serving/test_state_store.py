"""User-state blobs and the SQLite store."""

import sqlite3

import pytest
import torch

from ksa_rec.errors import StateError
from ksa_rec.serving.state import UserState
from ksa_rec.serving.store import SqliteStateStore


def _state():
    layer = {"k": torch.randn(3, 2, 4), "v": torch.randn(3, 2, 4), "idx": torch.tensor([5, 6, 7]),
             "sk": torch.randn(1, 2, 4), "sv": torch.randn(1, 2, 4), "sidx": torch.tensor([0])}
    return UserState(8, 1234, 17, torch.randn(8), torch.tensor([2, 5, 17]), [layer, layer])


def test_round_trip_is_exact():
    state = _state()
    back = UserState.from_bytes(state.to_bytes("m1"), "m1", "u")
    assert (back.event_count, back.last_timestamp, back.last_item) == (8, 1234, 17)
    assert torch.equal(back.vector, state.vector) and torch.equal(back.seen, state.seen)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(back.layers, state.layers) for k in a)


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
    assert store.meta() == {"position": "2"}
    assert [rows for rows in store.scan(1)] == [[("a", b"1")], [("b", b"2")]]


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    bad = tmp_path / "s.db"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StateError, match="not a usable state store"):
        SqliteStateStore(bad).meta()


def test_wal_mode(tmp_path):
    SqliteStateStore(tmp_path / "s.db").commit({"a": b"1"}, {})
    assert sqlite3.connect(tmp_path / "s.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
