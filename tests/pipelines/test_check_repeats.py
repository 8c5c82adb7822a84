"""pipelines/check_repeats.py: which evaluation targets repeat an item of their own history."""

import importlib.util
import json
import sys
from pathlib import Path

from ksa_rec.data.etl import build_interactions
from ksa_rec.data.readers import read_jsonl_lines
from ksa_rec.data.split import leave_one_out

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("check_repeats", ROOT / "pipelines" / "check_repeats.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_repeats"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_repeats_are_targets_whose_item_is_earlier_in_the_same_history():
    histories = {"u1": "a b a", "u2": "c d e", "u3": "f f g f", "u4": "d c"}  # u4: too short to evaluate
    lines = [json.dumps({"user_id": u, "item_id": item, "timestamp": t})
             for u, items in histories.items() for t, item in enumerate(items.split())]
    data = build_interactions(read_jsonl_lines(lines))
    check = _module()
    splits = leave_one_out(data)
    valid, test = (check.targets_frame(data, getattr(splits, s)) for s in ("valid", "test"))
    # Validation targets: u1 b, u2 d, u3 g (none seen before); test: u1 a (seen), u2 e, u3 f (seen twice).
    assert valid["repeat"].to_list() == [False, False, False]
    assert test["repeat"].to_list() == [True, False, True]
    assert check.users_with_repeats(data) == 2
