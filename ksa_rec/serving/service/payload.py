"""The body of ``POST /events`` -> validated events, or a ``RequestError`` with a status and one line.

A body is ``{"events": [event, ...]}``; an event is an object with ``user_id``, ``item_id``,
``timestamp`` and optionally the checkpoint's feature columns, nothing else. Values are read by the same
reader as ``ksa-rec stream --events -`` (``read_jsonl_lines``): what it cannot turn into an event is a
bad row, handed to admission's bad-event policy with the rest (rows count the request's events from 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import polars as pl

from ksa_rec.data.readers import BadRow, read_jsonl_lines
from ksa_rec.data.schema import ITEM, TIME, USER, LogSchema
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

    @property
    def users(self) -> list[str]:
        """Distinct users, in order of first appearance."""
        return self.frame[USER].unique(maintain_order=True).to_list()


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
    lines = []
    for i, event in enumerate(events, 1):
        if not isinstance(event, dict):
            raise RequestError(422, f"event {i}: not a JSON object")
        extra = sorted(set(event) - set(fields))
        if extra:
            raise RequestError(422, f"event {i}: unknown field {extra[0]!r} (fields: {', '.join(fields)})")
        missing = [name for name in (USER, ITEM, TIME) if name not in event]
        if missing:
            raise RequestError(422, f"event {i}: missing field {missing[0]!r}")
        lines.append(json.dumps({name: event.get(name) for name in fields}))
    bad: list[BadRow] = []
    try:
        frame = read_jsonl_lines(lines, schema=schema, file=REQUEST, bad_rows=bad)
    except DataError as err:
        raise RequestError(422, str(err)) from None
    return EventsRequest(frame, bad)
