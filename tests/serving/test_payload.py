"""``parse_events``' direct frame for requests whose values are already clean equals the stream reader's
output for the same events; any other value goes through the reader."""

from __future__ import annotations

import json
import random

import polars as pl
import pytest

from ksa_rec.data.readers import read_jsonl_lines
from ksa_rec.data.schema import LogSchema
from ksa_rec.serving.service.payload import _clean_frame, parse_events

SCHEMA = LogSchema(features=("category", "genre"))
TEXT = ["a", "u1", "7", "0", "-3", "x y", "é", "用户", "a\tb", "nanx", "null", "true", "1e3", "12.0", '"q"']


def _reader(records: list[dict], schema: LogSchema) -> pl.DataFrame:
    fields = ("user_id", "item_id", "timestamp", *schema.features)
    lines = [json.dumps({name: record.get(name) for name in fields}) for record in records]
    return read_jsonl_lines(lines, schema=schema, file="request", bad_rows=[])


def _body(records: list[dict]) -> bytes:
    return json.dumps({"events": records}).encode()


@pytest.mark.parametrize("seed", range(5))
def test_clean_requests_get_the_readers_frame(seed):
    rng = random.Random(seed)
    records = []
    for _ in range(rng.randint(1, 20)):
        record = {"user_id": rng.choice(TEXT), "item_id": rng.choice(TEXT),
                  "timestamp": rng.choice([0, 1, -5, 1_000_000, 2**63 - 1, -(2**63)])}
        for name in SCHEMA.features:
            choice = rng.random()
            if choice < 0.6:
                record[name] = rng.choice(TEXT)
            elif choice < 0.8:
                record[name] = None
        records.append(record)
    request = parse_events(_body(records), SCHEMA, 256)
    assert _clean_frame([{k: r.get(k) for k in ("user_id", "item_id", "timestamp", *SCHEMA.features)}
                         for r in records], SCHEMA) is not None
    expected = _reader(records, SCHEMA)
    assert request.frame.schema == expected.schema
    assert request.frame.equals(expected)
    assert request.bad_rows == []
    assert request.users == list(dict.fromkeys(expected["user_id"].to_list()))


@pytest.mark.parametrize("field, value", [
    ("user_id", " a"), ("user_id", "a\n"), ("user_id", ""), ("user_id", "NaN"), ("user_id", 7), ("user_id", None),
    ("user_id", 7.0), ("item_id", True), ("item_id", "b\u00a0"), ("item_id", "x\x1f"), ("timestamp", "5"),
    ("timestamp", 5.0), ("timestamp", 2**63), ("timestamp", True), ("timestamp", None), ("category", ""),
    ("category", " c"), ("category", 3), ("category", False)])
def test_other_values_go_through_the_reader(field, value):
    records = [{"user_id": "u", "item_id": "i", "timestamp": 10, "category": "c"}, {"user_id": "v", "item_id": "j",
                                                                                       "timestamp": 11}]
    records[0][field] = value
    full = [{k: r.get(k) for k in ("user_id", "item_id", "timestamp", *SCHEMA.features)} for r in records]
    assert _clean_frame(full, SCHEMA) is None
    request = parse_events(_body(records), SCHEMA, 256)
    bad: list = []
    fields = ("user_id", "item_id", "timestamp", *SCHEMA.features)
    expected = read_jsonl_lines([json.dumps(r) for r in full], schema=SCHEMA, file="request", bad_rows=bad)
    assert fields == tuple(expected.columns[1:])
    assert request.frame.equals(expected)
    assert request.bad_rows == bad
