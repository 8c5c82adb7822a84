"""ETL: stable time sort, duplicates, min_user_events, arrays, save/load, the cache, real datasets."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from jsonargparse import ArgumentParser

from ksa_rec.data import etl
from ksa_rec.data.etl import EtlConfig, InteractionData, cache_location, load_interactions
from ksa_rec.data.schema import LogSchema
from ksa_rec.errors import DataError

HEADER = "user_id,item_id,timestamp\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path: Path, **kwargs) -> InteractionData:
    return load_interactions(EtlConfig(path=str(path), cache_dir=None, **kwargs))


def assert_same(a: InteractionData, b: InteractionData) -> None:
    assert a.users == b.users and a.items == b.items and a.features == b.features
    for name in ("offsets", "item_ids", "timestamps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype == np.int64
    for mine, theirs in ((a.feature_ids, b.feature_ids), (a.labels, b.labels)):
        assert mine.keys() == theirs.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key])


# ---------------------------------------------------------------------------------------- ordering

def test_stable_time_sort_keeps_file_order_on_ties_and_users_in_first_appearance(tmp_path):
    path = write(tmp_path, "log.csv", HEADER +
                 "u2,z,9\n"    # row 1: u2 appears first, so it is user row 0
                 "u1,a,5\n"    # row 2
                 "u1,b,3\n"    # row 3
                 "u1,c,5\n"    # row 4: ties with row 2 at t=5 -> after it
                 "u1,d,3\n"    # row 5: ties with row 3 at t=3 -> after it
                 "u2,y,1\n")
    data = load(path)
    assert data.users.raw_ids.to_list() == ["u2", "u1"]
    np.testing.assert_array_equal(data.offsets, [0, 2, 6])
    assert data.items.decode(data.item_ids) == ["y", "z", "b", "d", "a", "c"]
    np.testing.assert_array_equal(data.timestamps, [1, 9, 3, 3, 5, 5])
    # Item ids follow first appearance in the sorted event stream.
    assert data.items.raw_ids.to_list() == ["y", "z", "b", "d", "a", "c"]
    np.testing.assert_array_equal(data.item_ids, [2, 3, 4, 5, 6, 7])
    assert (data.num_users, data.num_items, data.num_events) == (2, 8, 6)
    np.testing.assert_array_equal(data.lengths(), [2, 4])


def test_sort_matches_python_stable_sort_on_many_ties(tmp_path):
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 3000)
    times = rng.integers(0, 4, 3000)  # few distinct timestamps: ties everywhere
    lines = [f"u{u},i{row},{t}" for row, (u, t) in enumerate(zip(users, times))]
    data = load(write(tmp_path, "ties.csv", HEADER + "\n".join(lines) + "\n"))
    # Oracle: Python's sorted() is stable; users in order of first appearance.
    first_seen = list(dict.fromkeys(f"u{u}" for u in users))
    expected = []
    for user in first_seen:
        events = [(t, f"i{row}") for row, (u, t) in enumerate(zip(users, times)) if f"u{u}" == user]
        expected += [item for _, item in sorted(events, key=lambda e: e[0])]
    assert data.users.raw_ids.to_list() == first_seen
    assert data.items.decode(data.item_ids) == expected


def test_features_and_labels_follow_the_sorted_events(tmp_path):
    path = write(tmp_path, "log.csv", "user_id,item_id,timestamp,cat,dist\n"
                 "1,a,2,x,10\n1,b,1,,20\n2,a,0,y,30\n")
    data = load(path, schema=LogSchema(features=("cat",), labels=("dist",)))
    assert data.features["cat"].raw_ids.to_list() == ["x", "y"]  # the missing value is not a category
    np.testing.assert_array_equal(data.feature_ids["cat"], [1, 2, 3])  # b (no category) -> OOV = 1
    np.testing.assert_array_equal(data.labels["dist"], [20, 10, 30])


# -------------------------------------------------------------------------------------- duplicates

DUPLICATED = HEADER + "1,a,5\n1,b,6\n2,a,5\n1,a,5\n"


def test_duplicates_error_names_both_rows(tmp_path):
    path = write(tmp_path, "dup.csv", DUPLICATED)
    with pytest.raises(DataError) as info:
        load(path)
    assert str(info.value) == (f"{path}: row 4: duplicate of row 1 (user '1', item 'a', timestamp 5); "
                               "set on_duplicate to 'drop' or 'keep' to accept duplicates")


def test_duplicates_drop_keeps_the_first_and_keep_keeps_all(tmp_path):
    path = write(tmp_path, "dup.csv", "user_id,item_id,timestamp,src\n"
                 "1,a,5,first\n1,b,6,x\n2,a,5,x\n1,a,5,second\n")
    schema = LogSchema(features=("src",))
    dropped = load(path, on_duplicate="drop", schema=schema)
    np.testing.assert_array_equal(dropped.offsets, [0, 2, 3])
    assert dropped.features["src"].decode(dropped.feature_ids["src"]) == ["first", "x", "x"]
    kept = load(path, on_duplicate="keep", schema=schema)
    np.testing.assert_array_equal(kept.offsets, [0, 3, 4])
    assert kept.features["src"].decode(kept.feature_ids["src"]) == ["first", "second", "x", "x"]


def test_min_user_events_drops_short_users_and_their_items(tmp_path):
    path = write(tmp_path, "log.csv", HEADER + "1,a,1\n2,b,1\n2,c,2\n3,d,1\n3,a,2\n3,e,3\n")
    data = load(path, min_user_events=2)
    assert data.users.raw_ids.to_list() == ["2", "3"]
    np.testing.assert_array_equal(data.lengths(), [2, 3])
    assert data.items.raw_ids.to_list() == ["b", "c", "d", "a", "e"]
    with pytest.raises(DataError, match=r"log.csv: no user has at least 4 events"):
        load(path, min_user_events=4)


def test_config_validation_and_yaml():
    with pytest.raises(ValueError, match="on_duplicate"):
        EtlConfig(path="x", on_duplicate="ignore")
    with pytest.raises(ValueError, match="min_user_events"):
        EtlConfig(path="x", min_user_events=0)
    with pytest.raises(ValueError, match="format"):
        EtlConfig(path="x", format="xml")
    parser = ArgumentParser()
    parser.add_argument("--etl", type=EtlConfig)
    parsed = parser.instantiate(parser.parse_string(
        "etl:\n  path: a.csv\n  schema:\n    user_col: uid\n    features: [cat]\n  min_user_events: 3\n"
        "  cache_dir: null\n"))
    assert parsed.etl == EtlConfig(path="a.csv", schema=LogSchema(user_col="uid", features=("cat",)),
                                   min_user_events=3, cache_dir=None)


# ------------------------------------------------------------------------------------ save / load

def small_data(tmp_path: Path) -> InteractionData:
    path = write(tmp_path, "small.csv",
                 "user_id,item_id,timestamp,cat,dist\n1,a,2,x,1\n1,b,1,y,2\n2,a,0,x,3\n")
    return load(path, schema=LogSchema(features=("cat",), labels=("dist",)))


def test_save_load_round_trip_and_replace(tmp_path):
    data = small_data(tmp_path)
    data.save(tmp_path / "saved")
    assert_same(InteractionData.load(tmp_path / "saved"), data)
    data.labels["dist"] = data.labels["dist"] * 10
    data.save(tmp_path / "saved")  # replaces the directory
    assert_same(InteractionData.load(tmp_path / "saved"), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "small.csv"]  # no temporaries left


def test_save_is_atomic(tmp_path, monkeypatch):
    data = small_data(tmp_path)
    real_save = np.save
    calls = []

    def crash_on_second_array(path, arr, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, arr, **kwargs)

    monkeypatch.setattr(np, "save", crash_on_second_array)
    with pytest.raises(OSError, match="disk full"):
        data.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.csv"]


def corrupt_offsets(directory: Path) -> None:
    np.save(directory / "offsets.npy", np.array([0, 2, 1], dtype=np.int64))


def corrupt_truncate(directory: Path) -> None:
    raw = (directory / "item_ids.npy").read_bytes()
    (directory / "item_ids.npy").write_bytes(raw[:-5])


def corrupt_version(directory: Path) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta["version"] = 0
    (directory / "meta.json").write_text(json.dumps(meta))


def corrupt_vocab(directory: Path) -> None:
    (directory / "vocab_items.json").write_text('{"kind": "ksa_rec.Vocab", "version": 1, "ids": ["a", "a"]}')


def corrupt_dtype(directory: Path) -> None:
    np.save(directory / "timestamps.npy", np.array([1.0, 2.0, 3.0]))


def corrupt_items(directory: Path) -> None:
    np.save(directory / "item_ids.npy", np.array([2, 3, 9], dtype=np.int64))


def corrupt_time_order(directory: Path) -> None:
    np.save(directory / "timestamps.npy", np.array([2, 1, 0], dtype=np.int64))


@pytest.mark.parametrize("corrupt, file, problem", [
    (corrupt_offsets, "", "offsets must rise monotonically from 0 to 3 events"),
    (corrupt_truncate, "item_ids.npy", "cannot read array"),
    (corrupt_version, "meta.json", "format version 0, this code reads 1"),
    (corrupt_vocab, "vocab_items.json", "corrupt vocabulary: vocabulary ids must be unique"),
    (corrupt_dtype, "timestamps.npy", "expected a 1-D int64 array, got float64 (3,)"),
    (corrupt_items, "", "item_ids outside [2, 4)"),
    (corrupt_time_order, "", "timestamps decrease within a user"),
])
def test_load_rejects_corruption(tmp_path, corrupt, file, problem):
    small_data(tmp_path).save(tmp_path / "saved")
    corrupt(tmp_path / "saved")
    with pytest.raises(DataError) as info:
        InteractionData.load(tmp_path / "saved")
    where = tmp_path / "saved" / file if file else tmp_path / "saved"
    assert str(info.value).startswith(f"{where}: {problem}")


# -------------------------------------------------------------------------------------------- cache

@pytest.fixture
def logged(tmp_path):
    path = write(tmp_path, "log.csv", HEADER + "1,a,2\n1,b,1\n2,a,0\n")
    return EtlConfig(path=str(path), cache_dir=str(tmp_path / "cache"))


def test_second_load_comes_from_the_cache_without_reading_the_file(logged, monkeypatch, caplog):
    first = load_interactions(logged)
    assert not first.from_cache
    location = cache_location(logged)
    assert (location / "meta.json").is_file()

    def no_reading(*args, **kwargs):
        raise AssertionError("the raw file was read although a cache entry exists")

    monkeypatch.setattr(etl, "read_interactions", no_reading)
    with caplog.at_level(logging.INFO, logger="ksa_rec.data.etl"):
        second = load_interactions(logged)
    assert second.from_cache
    assert_same(second, first)
    assert f"loaded cached interactions (2 users, 3 events) from {location}" in caplog.text


def test_changed_file_or_config_invalidates_the_cache(logged):
    first = load_interactions(logged)
    location = cache_location(logged)
    Path(logged.path).write_text(HEADER + "1,a,2\n1,b,1\n2,a,0\n2,c,7\n")
    assert cache_location(logged) != location
    changed = load_interactions(logged)
    assert not changed.from_cache and changed.num_events == first.num_events + 1
    # Same size, new mtime: still a new entry.
    stat = os.stat(logged.path)
    os.utime(logged.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not load_interactions(logged).from_cache
    again = EtlConfig(path=logged.path, cache_dir=logged.cache_dir, min_user_events=2)
    assert cache_location(again) != cache_location(logged)


def test_corrupt_cache_entry_is_a_data_error_saying_what_to_delete(logged):
    load_interactions(logged)
    location = cache_location(logged)
    corrupt_truncate(location)
    with pytest.raises(DataError) as info:
        load_interactions(logged)
    message = str(info.value)
    assert message.startswith(f"{location / 'item_ids.npy'}: cannot read array")
    assert message.endswith(f"(corrupt cache entry: delete {location} to rebuild it)")


def test_crash_while_caching_leaves_no_entry(logged, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError, match="killed"):
        load_interactions(logged)
    monkeypatch.undo()
    assert not cache_location(logged).exists()
    assert not load_interactions(logged).from_cache  # rebuilt cleanly
    assert load_interactions(logged).from_cache


def test_no_cache_dir_writes_nothing(tmp_path):
    path = write(tmp_path, "log.csv", HEADER + "1,a,2\n")
    cfg = EtlConfig(path=str(path), cache_dir=None)
    assert cache_location(cfg) is None
    assert not load_interactions(cfg).from_cache
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_missing_file_is_a_data_error(tmp_path):
    cfg = EtlConfig(path=str(tmp_path / "gone.csv"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="gone.csv: cannot read: No such file"):
        load_interactions(cfg)


# ------------------------------------------------------------------------------ real public datasets

def shared_data() -> Path:
    default = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return Path(os.environ.get("KSA_REC_SHARED_DATA", default))


@pytest.mark.parametrize("relative, users, items, events", [
    ("amazon-beauty/Beauty.txt", 22_363, 12_101, 198_502),
    ("ml-100k/u.data", 943, 1_682, 100_000),
    ("ml-latest-small/ratings.csv", 610, 9_724, 100_836),
])
def test_real_dataset_counts(relative, users, items, events):
    path = shared_data() / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (set KSA_REC_SHARED_DATA to the folder holding the public datasets)")
    data = load(path)
    assert (data.num_users, data.num_items - 2, data.num_events) == (users, items, events)
    data.validate()
    if relative.endswith("Beauty.txt"):
        # The file numbers items by first appearance in this same order, so dense id = raw id + 1.
        np.testing.assert_array_equal(data.items.raw_ids.cast(int).to_numpy() + 1, np.arange(2, items + 2))
        assert data.users.raw_ids.to_list()[:3] == ["1", "2", "3"]
