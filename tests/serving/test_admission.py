"""Admission: which events a stream applies (exactly-once by identity), the bad-event and unknown-item
policies, and the counts. No model: states are built by hand."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from ksa_rec.data.readers import BadRow
from ksa_rec.data.vocab import Vocab
from ksa_rec.errors import DataError
from ksa_rec.serving.admission import (
    REPLAY_WINDOW,
    Admission,
    AdmissionConfig,
    event_identities,
    time_gaps,
)
from ksa_rec.serving.state import UserState

ITEMS = Vocab(["a", "b", "c", "d", "e"])
FEATURES = {"category": Vocab(["x", "y"])}


def _frame(events: list[tuple[str, str, int]], category: str | None = "x", first_row: int = 1) -> pl.DataFrame:
    return pl.DataFrame({"row": list(range(first_row, first_row + len(events))),
                         "user_id": [u for u, _, _ in events], "item_id": [i for _, i, _ in events],
                         "timestamp": [t for _, _, t in events], "category": [category] * len(events)},
                        schema={"row": pl.Int64, "user_id": pl.String, "item_id": pl.String,
                                "timestamp": pl.Int64, "category": pl.String})


def _state(applied: list[tuple[str, int]], event_count: int | None = None) -> UserState:
    """The state of a user who had ``applied`` (item, ts) as its newest events, with category x."""
    frame = _frame([("u", i, t) for i, t in applied])
    ids = torch.from_numpy(event_identities(frame, FEATURES))
    count = len(applied) if event_count is None else event_count
    return UserState(count, applied[-1][1] if applied else 0, 0, torch.zeros(2), torch.zeros(0, dtype=torch.int64),
                     [], ids, torch.tensor([t for _, t in applied], dtype=torch.int64))


def _admission(**config) -> Admission:
    return Admission(AdmissionConfig(**config), ITEMS, FEATURES)


def _admit(admission: Admission, events, states) -> list[int]:
    """Rows admitted."""
    return _admit_frame(admission, _frame(events), states)


def _admit_frame(admission, frame, states) -> list[int]:
    admitted = admission.admit(frame, states, "in.jsonl")
    return admitted.frame["row"].to_list()


def test_identity_is_item_time_and_features_not_user_or_column_order():
    base = _frame([("u1", "a", 5), ("u2", "a", 5), ("u1", "a", 6), ("u1", "b", 5)])
    ids = event_identities(base, FEATURES)
    assert ids[0] == ids[1] and len(set(ids[[0, 2, 3]].tolist())) == 3
    reordered = base.select("category", "timestamp", "item_id", "user_id", "row")
    assert np.array_equal(event_identities(reordered, FEATURES), ids)
    assert event_identities(_frame([("u1", "a", 5)], category="y"), FEATURES)[0] != ids[0]
    assert event_identities(_frame([("u1", "a", 5)], category=None), FEATURES)[0] != ids[0]


def test_each_class_of_event():
    admission = _admission(on_bad_event="skip")
    states = {"u": _state([("a", 10), ("b", 20)])}
    events = [("u", "b", 20),  # replay of the newest event
              ("u", "c", 20),  # same second, not remembered: a sibling, new
              ("u", "a", 10),  # replay of an older remembered event
              ("u", "d", 15),  # older than the last applied and not a replay: late
              ("u", "e", 25)]  # new
    assert _admit(admission, events, states) == [2, 5]
    c = admission.counts
    assert (c.applied, c.replayed, c.late, c.duplicate, c.beyond_horizon, c.users) == (2, 2, 1, 0, 0, 1)


def test_late_event_under_the_error_policy_names_row_and_column():
    with pytest.raises(DataError, match=r"^in.jsonl: row 2, column 'timestamp': timestamp 15 is before the "
                                        r"user's previous event \(30\); events of a user must arrive in time order"):
        _admit(_admission(), [("u", "e", 30), ("u", "d", 15)], {"u": _state([("a", 20)])})


def test_beyond_the_replay_horizon_only_when_events_were_forgotten():
    window = [("a", 100 + i) for i in range(REPLAY_WINDOW)]
    forgot = _admission(on_bad_event="skip")
    assert _admit(forgot, [("u", "b", 50), ("u", "b", 100)], {"u": _state(window, event_count=500)}) == []
    assert forgot.counts.beyond_horizon == 2 and forgot.counts.late == 0
    # The whole history is remembered: an unknown older event cannot be a replay, so it is late.
    remembers = _admission(on_bad_event="skip")
    assert _admit(remembers, [("u", "b", 50)], {"u": _state(window)}) == [] and remembers.counts.late == 1


def test_window_keeps_the_newest_events():
    admission = _admission()
    events = [("u", "a", t) for t in range(REPLAY_WINDOW + 5)]
    admitted = admission.admit(_frame(events), {"u": UserState.empty([], 2, torch.float32)}, "in.jsonl")
    ids, ts = admitted.recent["u"]
    assert ts.tolist() == list(range(5, REPLAY_WINDOW + 5))
    assert ids.tolist() == event_identities(_frame(events[5:]), FEATURES).tolist()


def test_duplicate_in_this_run_versus_replay_of_an_earlier_run():
    events = [("u", "a", 10), ("u", "a", 10), ("u", "b", 11)]
    run = _admission()
    new_user = UserState.empty([], 2, torch.float32)
    assert _admit(run, events, {"u": new_user}) == [1, 3]
    assert (run.counts.duplicate, run.counts.replayed) == (1, 0)
    # The same run sees its committed state in a later micro-batch: a copy is still a duplicate.
    committed = _state([("a", 10), ("b", 11)])
    assert _admit_frame(run, _frame([("u", "a", 10)], first_row=4), {"u": committed}) == []
    assert (run.counts.duplicate, run.counts.replayed) == (2, 0)
    # A new run (a restart) reading the same rows: replays.
    restart = _admission()
    assert _admit(restart, events, {"u": committed}) == []
    assert (restart.counts.duplicate, restart.counts.replayed, restart.counts.users) == (0, 3, 0)


def test_time_gap_beyond_int64_is_a_bad_event_that_says_so():
    big = 2**62 + 2**61
    with pytest.raises(DataError, match=r"row 2, column 'timestamp': the time gap from the user's previous event "
                                        rf"\({-big}\) to {big} does not fit in int64"):
        _admit(_admission(), [("u", "a", -big), ("u", "b", big)], {"u": UserState.empty([], 2, torch.float32)})
    skip = _admission(on_bad_event="skip")
    assert _admit(skip, [("u", "a", -big), ("u", "b", big)], {"u": UserState.empty([], 2, torch.float32)}) == [1]
    assert skip.counts.malformed == 1


def test_gaps_of_admitted_events():
    old = [_state([("a", 100)]), UserState.empty([], 2, torch.float32)]
    gaps = time_gaps(old, np.array([2, 2]), np.array([100, 130, 7, 9]))
    assert gaps.tolist() == [0, 30, -1, 2]


@pytest.mark.parametrize("policy, applied, unknown", [("oov", [1, 2], 1), ("skip", [2], 1)])
def test_unknown_items_are_counted(policy, applied, unknown):
    admission = _admission(on_unknown_item=policy)
    frame = _frame([("u", "never-seen", 5), ("u", "a", 6)]).with_columns(pl.Series("category", ["zzz", None]))
    assert _admit_frame(admission, frame, {"u": UserState.empty([], 2, torch.float32)}) == applied
    # A missing category is not an unknown one; an unknown one counts only if its event is applied.
    assert (admission.counts.unknown_items, admission.counts.unknown_categories) == (unknown, len(applied) - 1)


def test_unknown_item_under_error_names_row_and_column():
    with pytest.raises(DataError, match=r"^in.jsonl: row 1, column 'item_id': unknown item id 'never-seen'"):
        _admit(_admission(on_unknown_item="error"), [("u", "never-seen", 5)],
               {"u": UserState.empty([], 2, torch.float32)})


def test_malformed_rows_follow_the_policy(tmp_path):
    rows = [BadRow(7, "timestamp", "missing value", '{"user_id": "u"}'), BadRow(3, None, "not a JSON object", "{x")]
    with pytest.raises(DataError, match=r"^in.jsonl: row 3: not a JSON object$"):
        _admission().reject_malformed(rows, "in.jsonl")
    skip = _admission(on_bad_event="skip")
    skip.reject_malformed(rows, "in.jsonl")
    assert skip.counts.malformed == 2
    letters = tmp_path / "dead.jsonl"
    dead = _admission(on_bad_event="dead-letter", dead_letter=letters)
    dead.reject_malformed(rows, "in.jsonl")
    dead.admit(_frame([("u", "b", 30), ("u", "a", 20)]), {"u": UserState.empty([], 2, torch.float32)}, "in.jsonl")
    records = [json.loads(line) for line in letters.read_text().splitlines()]
    assert [(r["row"], r["column"], r["kind"]) for r in records] == \
        [(3, None, "malformed"), (7, "timestamp", "malformed"), (2, "timestamp", "late")]
    assert records[0]["raw"] == "{x" and json.loads(records[2]["raw"])["item_id"] == "a"
    assert "before the user's previous event (30)" in records[2]["reason"]
    assert (dead.counts.malformed, dead.counts.late, dead.counts.applied) == (2, 1, 1)


@pytest.mark.parametrize("config", [dict(on_bad_event="dead-letter"), dict(dead_letter="x.jsonl"),
                                    dict(on_bad_event="ignore"), dict(on_unknown_item="drop")])
def test_config_is_validated(config):
    with pytest.raises(ValueError):
        AdmissionConfig(**config)
