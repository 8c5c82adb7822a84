"""pipelines/check_repeats.py: which evaluation targets repeat an item of their own history."""

import json

import pytest

from ksa_rec.data.etl import build_interactions
from ksa_rec.data.readers import read_jsonl_lines
from ksa_rec.data.split import leave_one_out


@pytest.fixture(scope="module")
def check_repeats(load_pipeline):
    return load_pipeline("check_repeats")


def test_repeats_are_targets_whose_item_is_earlier_in_the_same_history(check_repeats):
    histories = {"u1": "a b a", "u2": "c d e", "u3": "f f g f", "u4": "d c"}  # u4: too short to evaluate
    lines = [json.dumps({"user_id": u, "item_id": item, "timestamp": t})
             for u, items in histories.items() for t, item in enumerate(items.split())]
    data = build_interactions(read_jsonl_lines(lines))
    check = check_repeats
    splits = leave_one_out(data)
    valid, test = (check.targets_frame(data, getattr(splits, s)) for s in ("valid", "test"))
    # Validation targets: u1 b, u2 d, u3 g (none seen before); test: u1 a (seen), u2 e, u3 f (seen twice).
    assert valid["repeat"].to_list() == [False, False, False]
    assert test["repeat"].to_list() == [True, False, True]
    assert check.users_with_repeats(data) == 2
