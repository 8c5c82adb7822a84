"""Tests of the synthetic long-history generator: format, determinism, and that the planted signal is
really there (and learnable in principle) at the distances it claims."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ksa_rec.data.synthetic import (
    LONG_RANGE_SIGNALS,
    NO_EVIDENCE,
    PARQUET_METADATA_KEY,
    SCHEMA,
    SIGNAL_BACKGROUND,
    SIGNAL_RECURRENCE,
    SIGNAL_SERIES,
    SIGNAL_SHORT_RANGE,
    Catalogue,
    SyntheticConfig,
    build_catalogue,
    generate,
    write,
)

# KSA defaults: chunk k = 8, window W = 32 chunks; evidence further back than this is summary-only.
RAW_WINDOW = 264
NEAR = 200

SMALL = SyntheticConfig(num_users=60, num_items=2000, num_categories=20, min_length=300, max_length=1500,
                        num_series=20, num_niche_categories=4, seed=3)


@pytest.fixture(scope="module")
def small() -> pl.DataFrame:
    return generate(SMALL)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return build_catalogue(SMALL)


@pytest.fixture(scope="module")
def histories(small: pl.DataFrame, catalogue: Catalogue) -> list[dict[str, np.ndarray]]:
    """Per user: item numbers, signal, evidence distance and timestamps as numpy arrays."""
    index = {name: i for i, name in enumerate(catalogue.item_names)}
    out = []
    for user in small.partition_by("user_id", maintain_order=True):
        out.append({
            "item": np.array([index[x] for x in user["item_id"].to_list()]),
            "signal": user["signal"].to_numpy(),
            "distance": user["evidence_distance"].to_numpy(),
            "time": user["timestamp"].to_numpy(),
        })
    return out


def _series_lookup(cat: Catalogue) -> tuple[dict[int, tuple[int, int]], dict[int, int]]:
    """episode item -> (series, episode index); hub item -> series."""
    episode = {int(x): (s, e) for (s, e), x in np.ndenumerate(cat.series_episodes)}
    hub = {int(x): s for s, x in enumerate(cat.series_hub)}
    return episode, hub


# ------------------------------------------------------------------------------------------------
# Format and determinism.


def test_schema_and_id_formats(small: pl.DataFrame) -> None:
    assert small.schema == pl.Schema(SCHEMA)
    assert small["user_id"].str.contains(r"^u\d{7}$").all()
    assert small["item_id"].str.contains(r"^i\d{6}$").all()
    assert small["category"].str.contains(r"^c\d{2}$").all()
    assert small["user_id"].n_unique() == SMALL.num_users
    assert set(small["signal"].unique()) == {SIGNAL_BACKGROUND, SIGNAL_SHORT_RANGE, SIGNAL_SERIES,
                                              SIGNAL_RECURRENCE}


def test_deterministic_and_seed_dependent(small: pl.DataFrame) -> None:
    assert generate(SMALL).equals(small)
    assert not generate(replace(SMALL, seed=4)).equals(small)


def test_catalogue_does_not_depend_on_users() -> None:
    a, b = build_catalogue(SMALL), build_catalogue(replace(SMALL, num_users=7, max_length=5000))
    assert np.array_equal(a.category_of, b.category_of)
    assert np.array_equal(a.series_episodes, b.series_episodes)


def test_item_category_is_a_function_matching_the_catalogue(small: pl.DataFrame,
                                                            catalogue: Catalogue) -> None:
    per_item = small.group_by("item_id").agg(pl.col("category").n_unique().alias("n"),
                                             pl.col("category").first())
    assert (per_item["n"] == 1).all()
    index = {name: i for i, name in enumerate(catalogue.item_names)}
    expected = [catalogue.category_names[catalogue.category_of[index[x]]] for x in per_item["item_id"]]
    assert per_item["category"].to_list() == expected


def test_lengths_within_bounds_and_long_tailed() -> None:
    cfg = SyntheticConfig(num_users=400, min_length=64, max_length=2000, length_tail=1.5)
    lengths = generate(cfg).group_by("user_id").len()["len"].to_numpy()
    assert lengths.min() >= cfg.min_length and lengths.max() <= cfg.max_length
    # Pareto(1.5): median ~1.6x the minimum, mean ~2.5x; a thin-tailed law would have mean ~ median.
    assert lengths.mean() > 1.3 * np.median(lengths)
    assert np.quantile(lengths, 0.95) > 4 * cfg.min_length


def test_timestamps_strictly_increasing_with_sessions(histories, catalogue: Catalogue) -> None:
    cues = set(catalogue.series_hub.tolist()) | set(catalogue.niche_hub.tolist())
    for h in histories:
        gap = np.diff(h["time"])
        assert (gap >= 1).all()
        # Every cue opens a session of its own and its target follows inside that session.
        at_cue = np.flatnonzero(np.isin(h["item"][1:-1], list(cues))) + 1
        assert (gap[at_cue - 1] >= SMALL.session_timeout_s).all()
        assert (gap[at_cue] < SMALL.session_timeout_s).all()


def test_write_is_atomic_and_round_trips(tmp_path: Path, small: pl.DataFrame) -> None:
    target = tmp_path / "sub" / "synthetic.parquet"
    target.parent.mkdir()
    target.write_bytes(b"old content")
    assert write(SMALL, target) == target.resolve()
    assert pl.read_parquet(target).equals(small)
    stored = json.loads(pq.read_schema(target).metadata[PARQUET_METADATA_KEY])
    assert SyntheticConfig(**stored) == SMALL
    assert [p.name for p in target.parent.iterdir()] == ["synthetic.parquet"]   # no temp files left


def test_config_fills_from_yaml_with_jsonargparse() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SyntheticConfig, "data")
    parsed = parser.parse_string("data:\n  num_users: 10\n  noise_prob: 0.1\n  long_gap_max: 6000\n")
    assert SyntheticConfig(**parsed.data.as_dict()) == SyntheticConfig(num_users=10, noise_prob=0.1,
                                                                       long_gap_max=6000)


@pytest.mark.parametrize(("change", "field"), [
    ({"min_length": 500, "max_length": 400}, "max_length"),
    ({"num_items": 500}, "num_items"),
    ({"episodes_per_series": 6}, "episodes_per_series"),
    ({"num_niche_categories": 50}, "num_niche_categories"),
    ({"niche_interests_per_user": 11}, "niche_interests_per_user"),
    ({"long_gap_min": 5000}, "long_gap_max"),
    ({"num_users": 2.5}, "num_users"),
    ({"noise_prob": 1.0}, "noise_prob"),
])
def test_bad_config_raises_one_line_error_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^SyntheticConfig\.{field}\b") as err:
        SyntheticConfig(**change)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# Planted signal.


def test_evidence_distance_set_exactly_on_long_range_targets(small: pl.DataFrame) -> None:
    long_range = small["signal"].is_in(list(LONG_RANGE_SIGNALS))
    assert (small.filter(long_range)["evidence_distance"] >= 1).all()
    assert (small.filter(~long_range)["evidence_distance"] == NO_EVIDENCE).all()


def test_long_range_targets_are_a_minority_at_near_and_far_distances(small: pl.DataFrame) -> None:
    share = small["signal"].is_in(list(LONG_RANGE_SIGNALS)).mean()
    assert 0.02 < share < 0.1
    for signal in LONG_RANGE_SIGNALS:
        distance = small.filter(pl.col("signal") == signal)["evidence_distance"].to_numpy()
        assert (distance < NEAR).sum() >= 20 and (distance > RAW_WINDOW).sum() >= 50
        assert (distance > 1000).sum() >= 5


def test_series_resumption_evidence_is_where_the_user_left_off(histories, catalogue: Catalogue) -> None:
    episode_of, hub_of = _series_lookup(catalogue)
    checked = 0
    for h in histories:
        item = h["item"]
        for i in np.flatnonzero(h["signal"] == SIGNAL_SERIES):
            d = h["distance"][i]
            series, e = episode_of[int(item[i])]
            assert hub_of[int(item[i - 1])] == series                       # the cue comes right before
            assert episode_of[int(item[i - d])] == (series, e - 1)         # evidence: the previous episode
            between = [episode_of.get(int(x), (-1, -1))[0] for x in item[i - d + 1:i]]
            assert series not in between                                    # ...and the last one watched
            checked += 1
    assert checked > 100


def test_recurrence_evidence_is_the_latest_earlier_consumption(histories, catalogue: Catalogue) -> None:
    niche_hub_of_category = dict(zip(catalogue.niche_category.tolist(), catalogue.niche_hub.tolist()))
    niche_items = set(catalogue.niche_items.ravel().tolist())
    checked = 0
    for h in histories:
        item = h["item"]
        for i in np.flatnonzero(h["signal"] == SIGNAL_RECURRENCE):
            d = h["distance"][i]
            assert int(item[i]) in niche_items
            assert item[i - 1] == niche_hub_of_category[int(catalogue.category_of[item[i]])]
            assert item[i - d] == item[i] and item[i] not in item[i - d + 1:i]
            checked += 1
    assert checked > 50


def test_short_range_events_follow_the_local_pattern(histories, catalogue: Catalogue) -> None:
    """Signal 1: a ring successor of the previous in-pattern item, or the next episode of a binge."""
    episode_of, _ = _series_lookup(catalogue)
    ring_index = np.full(SMALL.num_items, -1)
    ring_index[catalogue.ring_items] = np.arange(catalogue.ring_items.size)
    checked = 0
    for h in histories:
        item, signal = h["item"], h["signal"]
        for i in np.flatnonzero((signal[1:] == SIGNAL_SHORT_RANGE) & (signal[:-1] == SIGNAL_SHORT_RANGE)) + 1:
            cur, prev = int(item[i]), int(item[i - 1])
            if cur in episode_of:
                s, e = episode_of[cur]
                assert episode_of[prev] == (s, e - 1)
                continue
            c = catalogue.ring_category[ring_index[cur]]
            assert catalogue.ring_category[ring_index[prev]] == c
            step = (ring_index[cur] - ring_index[prev]) % catalogue.ring_size[c]
            assert 1 <= step <= SMALL.successors_per_item
            checked += 1
    assert checked > 1000


# ------------------------------------------------------------------------------------------------
# Learnable in principle: oracles with and without long-range memory.


def _series_oracle(item: np.ndarray, i: int, lookback: int, cat: Catalogue,
                   episode_of: dict[int, tuple[int, int]], hub_of: dict[int, int]) -> int:
    """Predict the event after the series cue at i-1: the episode after the last one of that series
    seen in the previous ``lookback`` events (episode 1 if none is seen)."""
    series = hub_of[int(item[i - 1])]
    seen = [episode_of[int(x)][1] for x in item[max(0, i - lookback):i - 1]
            if episode_of.get(int(x), (-1, -1))[0] == series]
    return int(cat.series_episodes[series, max(seen) + 1 if seen else 0])


def _recurrence_oracle(item: np.ndarray, i: int, lookback: int, cat: Catalogue) -> set[int]:
    """Candidate set after the niche cue at i-1: the user's items of that category in the lookback."""
    category = cat.category_of[item[i - 1]]
    window = item[max(0, i - lookback):i - 1]
    return {int(x) for x in window if cat.category_of[x] == category and x != item[i - 1]}


def test_long_range_targets_need_memory_beyond_the_window(histories, catalogue: Catalogue) -> None:
    episode_of, hub_of = _series_lookup(catalogue)
    hits: dict[tuple[str, str, str], list[bool]] = {}
    for h in histories:
        item = h["item"]
        for i in np.flatnonzero(np.isin(h["signal"], LONG_RANGE_SIGNALS)):
            bucket = "far" if h["distance"][i] > RAW_WINDOW else "near" if h["distance"][i] < NEAR else "mid"
            for memory, lookback in (("full", i), ("window", RAW_WINDOW)):
                if h["signal"][i] == SIGNAL_SERIES:
                    hit = _series_oracle(item, i, lookback, catalogue, episode_of, hub_of) == item[i]
                    kind = "series"
                else:
                    hit = int(item[i]) in _recurrence_oracle(item, i, lookback, catalogue)
                    kind = "recurrence"
                hits.setdefault((kind, memory, bucket), []).append(hit)
    acc = {key: float(np.mean(v)) for key, v in hits.items()}
    for kind in ("series", "recurrence"):
        assert acc[(kind, "full", "far")] == 1.0 and acc[(kind, "full", "near")] == 1.0
        assert acc[(kind, "window", "near")] == 1.0
        assert acc[(kind, "window", "far")] < 0.05
    # Every user's favourites of one interest fit in a top-10 list.
    assert SMALL.favourites_per_interest <= 10


def test_cue_alone_does_not_pin_the_target(small: pl.DataFrame, catalogue: Catalogue) -> None:
    """Without memory the best guess after a cue is the cue's most frequent followers: a top-10 of
    those must miss most long-range targets, or HR@10 could not tell memory from no memory."""
    cues = [catalogue.item_names[x] for x in np.concatenate([catalogue.series_hub, catalogue.niche_hub])]
    after_cue = (small.with_columns(cue=pl.col("item_id").shift(1).over("user_id"))
                 .filter(pl.col("cue").is_in(cues)))
    top10 = (after_cue.group_by("cue", "item_id").len()
             .sort(["cue", "len", "item_id"], descending=[False, True, False])
             .group_by("cue", maintain_order=True).head(10))
    for signal in LONG_RANGE_SIGNALS:
        targets = after_cue.filter(pl.col("signal") == signal)
        hit_rate = targets.join(top10, on=["cue", "item_id"], how="semi").height / targets.height
        assert hit_rate < 0.6, (signal, hit_rate)


def test_short_range_pattern_beats_popularity(small: pl.DataFrame) -> None:
    """A bigram model fitted on half the users predicts the other half's signal-1 events far better
    than the most popular items do."""
    df = small.with_columns(prev=pl.col("item_id").shift(1).over("user_id"))
    users = df["user_id"].unique().sort()
    train = df.filter(pl.col("user_id").is_in(users[: users.len() // 2].implode()))
    test = df.filter(~pl.col("user_id").is_in(train["user_id"].unique().implode())
                     & (pl.col("signal") == SIGNAL_SHORT_RANGE) & pl.col("prev").is_not_null())
    top10 = (train.drop_nulls("prev").group_by("prev", "item_id").len()
             .sort(["prev", "len", "item_id"], descending=[False, True, False])
             .group_by("prev", maintain_order=True).head(10))
    bigram_hr = test.join(top10, on=["prev", "item_id"], how="semi").height / test.height
    popular = train.group_by("item_id").len().sort(["len", "item_id"], descending=[True, False]).head(10)
    popularity_hr = test.join(popular, on="item_id", how="semi").height / test.height
    assert bigram_hr > 0.6 and bigram_hr > 5 * popularity_hr, (bigram_hr, popularity_hr)
