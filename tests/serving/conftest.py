"""A small trained checkpoint (hybrid KSA + full, time gaps, a side feature) and event files from the
synthetic generator, shared by the serving tests."""

from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _train(work: Path, pattern: str, *extra: str) -> Path:
    from ksa_rec.training.cli import run_lightning

    run_lightning(["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--trainer.max_epochs", "1",
                   "--model.encoder.pattern", pattern, "--model.encoder.time_gap_buckets", "16",
                   "--model.encoder.mka", '{"local_window": 12, "block_size": 4, "max_blocks": 4, "fast_window": 10}',
                   "--trainer.default_root_dir", str(work), "--trainer.logger", "false",
                   "--data.cache_dir", str(work / "cache"), *extra])
    return next(work.rglob("last.ckpt"))


@pytest.fixture(scope="session")
def trained_mka(tmp_path_factory):
    """A checkpoint whose layers are mka, fastmka and full."""
    return _train(tmp_path_factory.mktemp("trained_mka"), "mka,fastmka,full")


@pytest.fixture(scope="session")
def trained_hstu(tmp_path_factory):
    """A checkpoint whose layers are hstu (HSTU's pointwise attention) and full."""
    return _train(tmp_path_factory.mktemp("trained_hstu"), "hstu,full", "--model.encoder.hstu.normalizer", "16")


@pytest.fixture(scope="session")
def trained_chunk(tmp_path_factory):
    """A checkpoint whose summaries pool their chunk (summary_init: chunk), two summary slots a chunk."""
    return _train(tmp_path_factory.mktemp("trained_chunk"), "ksa,ksa", "--model.encoder.summary_init", "chunk",
                  "--model.encoder.summary_tokens", "2")


@pytest.fixture(scope="session")
def trained_cosine(tmp_path_factory):
    """A checkpoint whose head scores by cosine similarity (loss.similarity: cosine)."""
    return _train(tmp_path_factory.mktemp("trained_cosine"), "ksa,full", "--model.loss.similarity", "cosine",
                  "--model.loss.temperature", "0.1")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("trained")
    checkpoint = _train(work, "ksa,full")
    events = pl.read_parquet(next((work / "cache" / "synthetic").glob("*.parquet")))
    return checkpoint, events.select("user_id", "item_id", "timestamp", "category")


@pytest.fixture()
def event_files(trained, tmp_path):
    """The events of 6 users as jsonl (in time order across users) plus the frame itself."""
    _, events = trained
    users = events["user_id"].unique(maintain_order=True)[:6].to_list()
    frame = events.filter(pl.col("user_id").is_in(users)).sort("timestamp", maintain_order=True)
    path = tmp_path / "events.jsonl"
    frame.write_ndjson(path)
    return path, frame


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (Debian's package) for the session; tests get a flushed database from
    ``redis_url``."""
    from service_checks import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server):
    redis_server.client.flushall()
    return redis_server.url(0)
