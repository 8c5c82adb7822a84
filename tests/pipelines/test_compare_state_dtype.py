"""pipelines/compare_state_dtype.py: ``--users N`` keeps the first N users of the events, every event of theirs."""

import polars as pl


def test_first_users_keeps_whole_histories_in_file_order(load_pipeline, tmp_path):
    compare = load_pipeline("compare_state_dtype")
    events = pl.DataFrame({"user_id": ["b", "a", "b", "c", "a", "c"], "item_id": ["1", "2", "3", "4", "5", "6"],
                           "timestamp": [1, 2, 3, 4, 5, 6]})
    events.write_parquet(tmp_path / "events.parquet")
    kept = pl.read_parquet(compare.first_users(tmp_path / "events.parquet", 2, tmp_path / "kept.parquet"))
    assert kept["user_id"].to_list() == ["b", "a", "b", "a"]  # b and a appear first; c is dropped
    assert kept["item_id"].to_list() == ["1", "2", "3", "5"]
