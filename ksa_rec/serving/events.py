"""Event sources for ``ksa-rec stream`` and ``ksa-rec score``: validated micro-batches, in input order.

Rows are numbered as the user sees them (1-based data rows of a file, lines of stdin), and a source can
start after any committed position: that is how a restarted stream skips what it already applied.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import polars as pl

from ksa_rec.data.readers import read_interactions, read_jsonl_lines
from ksa_rec.data.schema import ROW, LogSchema

STDIN = "-"


@dataclass
class EventChunk:
    """A micro-batch: ``frame`` (columns row, user_id, item_id, timestamp, features...) and the input
    position after it (rows consumed from the start of the input)."""

    frame: pl.DataFrame
    end_position: int
    source: str


def iter_event_chunks(path: str, schema: LogSchema, chunk_rows: int, start_position: int = 0,
                      stdin: IO[str] | None = None) -> Iterator[EventChunk]:
    """Validated micro-batches of at most ``chunk_rows`` rows, from row ``start_position + 1`` on.

    Files (parquet, csv, jsonl) are read and validated whole first; ``"-"`` reads JSON lines from stdin
    incrementally, validating each micro-batch (rows count lines, blank ones included).
    """
    if path == STDIN:
        yield from _stdin_chunks(stdin or sys.stdin, schema, chunk_rows, start_position)
        return
    frame = read_interactions(path, schema=schema)
    total = int(frame[ROW].max())
    for start in range(start_position, total, chunk_rows):
        end = min(start + chunk_rows, total)
        yield EventChunk(frame.filter((pl.col(ROW) > start) & (pl.col(ROW) <= end)), end, path)


def _stdin_chunks(stream: IO[str], schema: LogSchema, chunk_rows: int, start_position: int) -> Iterator[EventChunk]:
    consumed = 0
    for _ in range(start_position):  # replayed input: skip what a previous run committed
        if not stream.readline():
            return
        consumed += 1
    while True:
        lines = []
        while len(lines) < chunk_rows and (line := stream.readline()):
            lines.append(line.rstrip("\n"))
        if not lines:
            return
        frame = read_jsonl_lines(lines, schema=schema, file="<stdin>", first_row=consumed + 1)
        consumed += len(lines)
        yield EventChunk(frame, consumed, "<stdin>")
