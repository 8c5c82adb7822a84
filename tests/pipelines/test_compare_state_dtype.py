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


def _write(path, rows):
    import json

    path.write_text("".join(json.dumps({"user_id": u, "event_count": n, "row": 0, "item_ids": i, "scores": s}) + "\n"
                            for u, n, i, s in rows))


def test_stepwise_pairs_every_step_by_user_and_event_count(load_pipeline, tmp_path):
    compare = load_pipeline("compare_state_dtype")
    fp32 = [("a", 1, ["x", "y"], [2.0, 1.0]), ("b", 1, ["x", "z"], [3.0, 1.0]),
            ("a", 2, ["x", "y"], [2.0, 1.5]), ("b", 2, ["z", "x"], [3.0, 2.0])]
    # bf16 wrote the same steps in another order: a's second step swaps the two items, b's second one drops x
    bf16 = [("b", 1, ["x", "z"], [3.0, 1.25]), ("a", 1, ["x", "y"], [2.0, 1.0]),
            ("b", 2, ["z", "w"], [3.5, 2.0]), ("a", 2, ["y", "x"], [1.5, 2.0])]
    _write(tmp_path / "fp32.jsonl", fp32)
    _write(tmp_path / "bf16.jsonl", bf16)
    rows = compare.stepwise(tmp_path / "fp32.jsonl", tmp_path / "bf16.jsonl", buckets=2)
    overall, first, second = rows
    assert (overall["events"], first["events"], second["events"]) == ("all", "1-1", "2-2")
    assert (overall["steps"], first["steps"], second["steps"]) == (4, 2, 2)
    assert first["same_order"] == 1 and first["score_err_max"] == 0.25
    assert second["overlap_mean"] == 0.75 and second["overlap_min"] == 0.5
    assert second["same_set"] == 0.5 and second["same_order"] == 0 and second["same_top1"] == 0.5
    assert second["score_err_max_mean"] == 0.5  # a: 0.5 at both ranks; b: 0.5 at rank 1
    assert overall["same_order"] == 0.5


def test_stepwise_refuses_streams_of_different_steps(load_pipeline, tmp_path):
    import pytest

    compare = load_pipeline("compare_state_dtype")
    _write(tmp_path / "fp32.jsonl", [("a", 1, ["x"], [1.0]), ("a", 2, ["x"], [1.0])])
    _write(tmp_path / "bf16.jsonl", [("a", 1, ["x"], [1.0])])
    with pytest.raises(ValueError, match="different .user, event count. steps"):
        compare.stepwise(tmp_path / "fp32.jsonl", tmp_path / "bf16.jsonl")
