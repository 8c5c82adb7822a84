"""The body of ``POST /events`` -> validated events, or a ``RequestError`` with a status and one line.

A body is ``{"events": [event, ...]}``; an event is an object with ``user_id``, ``item_id``,
``timestamp`` and optionally the checkpoint's feature columns, nothing else. Values are read by the same
reader as ``ksa-rec stream --events -`` (``read_jsonl_lines``): what it cannot turn into an event is a
bad row, handed to admission's bad-event policy with the rest (rows count the request's events from 1).

Most requests hold values already in the reader's output form (ids and features as text with nothing to
strip, an integer timestamp in int64 range): those are put in a frame directly (``_clean_frame``), the
frame the reader would build, without its per-call polars work (~1.5 ms a request on this CPU). Any
other value sends the whole request through the reader; ``tests/serving/test_payload.py`` holds the two
to the same output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import polars as pl

from ksa_rec.data.readers import MISSING_TEXT, BadRow, read_jsonl_lines
from ksa_rec.data.schema import ITEM, ROW, TIME, USER, LogSchema
from ksa_rec.errors import DataError

REQUEST = "request"
"""The "file" that one-line errors about a request's events name (``request: row 2, column ...``)."""
EVENTS_KEY = "events"


class RequestError(Exception):
    """A request refused as a whole: ``status`` (4xx) and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class EventsRequest:
    """The events of one request, ready for admission."""

    frame: pl.DataFrame
    """Readable events (columns as the stream reader outputs them), in request order."""
    bad_rows: list[BadRow] = field(default_factory=list)
    """Events the reader could not read (bad events: admission's policy decides)."""

    @cached_property
    def users(self) -> list[str]:
        """Distinct users, in order of first appearance (asked for by the batcher and the applier)."""
        return list(dict.fromkeys(self.frame[USER].to_list()))


def parse_events(body: bytes, schema: LogSchema, max_events: int) -> EventsRequest:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"malformed JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RequestError(422, 'the body must be a JSON object {"events": [...]}')
    unknown = sorted(set(data) - {EVENTS_KEY})
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; a request is {{\"events\": [...]}}")
    events = data.get(EVENTS_KEY)
    if not isinstance(events, list) or not events:
        raise RequestError(422, '"events" must be a non-empty list of event objects')
    if len(events) > max_events:
        raise RequestError(413, f"{len(events)} events in one request; at most {max_events} (--max-request-events)")
    fields = (USER, ITEM, TIME, *schema.features)
    records = []
    for i, event in enumerate(events, 1):
        if not isinstance(event, dict):
            raise RequestError(422, f"event {i}: not a JSON object")
        extra = sorted(set(event) - set(fields))
        if extra:
            raise RequestError(422, f"event {i}: unknown field {extra[0]!r} (fields: {', '.join(fields)})")
        missing = [name for name in (USER, ITEM, TIME) if name not in event]
        if missing:
            raise RequestError(422, f"event {i}: missing field {missing[0]!r}")
        records.append({name: event.get(name) for name in fields})
    frame = _clean_frame(records, schema)
    if frame is not None:
        return EventsRequest(frame)
    lines = [json.dumps(record) for record in records]
    bad: list[BadRow] = []
    try:
        frame = read_jsonl_lines(lines, schema=schema, file=REQUEST, bad_rows=bad)
    except DataError as err:
        raise RequestError(422, str(err)) from None
    return EventsRequest(frame, bad)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _clean_text(value: object) -> bool:
    """Text the reader keeps as it is: nothing to strip (Python's whitespace includes polars'), not a
    missing-value spelling."""
    return type(value) is str and value not in MISSING_TEXT and value.strip() == value


def _clean_frame(records: list[dict], schema: LogSchema) -> pl.DataFrame | None:
    """The reader's output for ``records`` (``read_jsonl_lines`` of their JSON lines) when every value is
    already in its output form: ids non-empty text, the timestamp a JSON integer in int64 range, each
    feature text or absent/null (absent: null, as the reader leaves it). None otherwise."""
    for record in records:
        if not (_clean_text(record[USER]) and _clean_text(record[ITEM])):
            return None
        ts = record[TIME]
        if type(ts) is not int or not _INT64_MIN <= ts <= _INT64_MAX:
            return None
        for name in schema.features:
            value = record[name]
            if value is not None and not (type(value) is str and value != "" and value.strip() == value):
                return None
    columns = {ROW: (pl.Int64, list(range(1, len(records) + 1)))}
    columns.update({name: (pl.Int64 if name == TIME else pl.String, [r[name] for r in records])
                    for name in (USER, ITEM, TIME, *schema.features)})
    return pl.DataFrame({name: pl.Series(name, values, dtype=dtype) for name, (dtype, values) in columns.items()})
