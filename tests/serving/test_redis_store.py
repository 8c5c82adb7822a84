"""The Redis state store against a real redis-server: the same operations and guarantees as SQLite, and
per-user claims that let several writers share it."""

import threading
import time

import pytest
from service_checks import store_blobs
from stream_checks import assert_same_states, stream

from ksa_rec.errors import StateError
from ksa_rec.serving.redis_store import RedisStateStore
from ksa_rec.serving.store import FORMAT_KEY, STORE_FORMAT, SqliteStateStore, open_store


def test_open_store_picks_the_implementation(redis_url, tmp_path):
    assert isinstance(open_store(redis_url), RedisStateStore)
    assert isinstance(open_store(tmp_path / "s.db"), SqliteStateStore)


def test_commit_is_atomic_and_checks_the_model(redis_url):
    store = RedisStateStore(redis_url)
    store.claim(["a", "b"])
    store.commit({"a": b"1", "b": b"2"}, {"model_id": "m1", "position": "2"})
    store.claim(["a", "c"])
    with pytest.raises(StateError, match="the store holds states of model m1, not m2"):
        store.commit({"a": b"changed", "c": b"3"}, {"model_id": "m2"})
    assert store.get_many(["a", "b", "c"]) == {"a": b"1", "b": b"2"}
    assert store.meta() == {FORMAT_KEY: STORE_FORMAT, "model_id": "m1", "position": "2"}
    assert list(store.scan(1)) == [[("a", b"1")], [("b", b"2")]] and len(store) == 2


def test_a_claim_keeps_other_writers_out_until_the_commit(redis_url):
    first, second = RedisStateStore(redis_url), RedisStateStore(redis_url, wait_s=5)
    first.claim(["u"])
    got = []
    waiter = threading.Thread(target=lambda: (second.claim(["u", "v"]), got.append(second.get_many(["u"]))))
    waiter.start()
    time.sleep(0.3)
    assert not got  # still waiting for "u"
    first.commit({"u": b"from first"}, {})
    waiter.join(5)
    assert got == [{"u": b"from first"}]  # the second writer reads what the first committed
    second.release()


def test_a_writer_that_lost_its_claim_cannot_commit(redis_url):
    slow, other = RedisStateStore(redis_url, lease_s=0.2), RedisStateStore(redis_url)
    slow.claim(["u"])
    time.sleep(0.3)  # the lease lapses (a stalled or killed writer)
    other.claim(["u"])
    other.commit({"u": b"new"}, {})
    with pytest.raises(StateError, match="lost the claim on ksa_rec:state:u"):
        slow.commit({"u": b"stale"}, {})
    assert other.get_many(["u"]) == {"u": b"new"}


def test_read_only_needs_an_existing_store_and_errors_are_one_line(redis_server, redis_url):
    with pytest.raises(StateError, match="no ksa-rec state store here"):
        RedisStateStore(redis_server.url(1), read_only=True)
    with pytest.raises(StateError) as err:
        RedisStateStore("redis://127.0.0.1:1/0")
    assert "\n" not in str(err.value)


def test_stream_into_redis_equals_stream_into_sqlite(trained, event_files, redis_url, tmp_path):
    checkpoint, _ = trained
    events, _ = event_files
    assert stream(checkpoint, events, tmp_path / "s.db", "--chunk-rows", "50") == 0
    assert stream(checkpoint, events, redis_url, "--chunk-rows", "50", "--output", str(tmp_path / "r.jsonl")) == 0
    # The same code on the same micro-batches: equal tensors (tol 0; the blobs' metadata order may differ).
    assert_same_states(checkpoint, store_blobs(redis_url), store_blobs(tmp_path / "s.db"), tol=0)
    # A rerun is all replays (exactly-once by identity, as with SQLite).
    assert stream(checkpoint, events, redis_url, "--chunk-rows", "50", "--output", str(tmp_path / "r.jsonl")) == 0
    assert_same_states(checkpoint, store_blobs(redis_url), store_blobs(tmp_path / "s.db"), tol=0)


def test_score_reads_a_redis_store(trained, event_files, redis_url, tmp_path):
    import polars as pl

    from ksa_rec.cli import main as ksa_rec

    checkpoint, _ = trained
    events, _ = event_files
    assert stream(checkpoint, events, tmp_path / "s.db") == 0
    assert stream(checkpoint, events, redis_url, "--output", str(tmp_path / "r.jsonl")) == 0
    for state, out in ((str(tmp_path / "s.db"), "from-sqlite.parquet"), (redis_url, "from-redis.parquet")):
        assert ksa_rec(["score", "--checkpoint", str(checkpoint), "--state", state, "--output", str(tmp_path / out),
                        "--accelerator", "cpu"]) == 0
    got, want = (pl.read_parquet(tmp_path / name).sort("user_id") for name in ("from-redis.parquet",
                                                                                "from-sqlite.parquet"))
    assert got.select("user_id", "event_count", "item_ids").equals(want.select("user_id", "event_count", "item_ids"))
