"""Event sources for ``ksa-rec stream``: validated micro-batches, in input order, always from row 1.

Rows are numbered as the user sees them (1-based data rows of a file, lines of stdin). A restarted run
reads its input again from the start: what an earlier run applied is recognised by event identity
(``ksa_rec.serving.admission``), not by position, so the input's name and offsets carry no meaning.
Micro-batches are cut by row number, so the same input with the same ``chunk_rows`` gives the same
micro-batches whatever rows turn out malformed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import polars as pl

from ksa_rec.data.readers import BadRow, read_interactions, read_jsonl_lines
from ksa_rec.data.schema import ROW, LogSchema

STDIN = "-"
STDIN_NAME = "<stdin>"

RejectRows = Callable[[list[BadRow], str], None]
"""Receives the rows a reader could not turn into events, and the input's name (may raise)."""


@dataclass
class EventChunk:
    """A micro-batch: ``frame`` (columns row, user_id, item_id, timestamp, features...) of ``source``."""

    frame: pl.DataFrame
    source: str


def iter_event_chunks(path: str, schema: LogSchema, chunk_rows: int, reject: RejectRows,
                      stdin: IO[str] | None = None) -> Iterator[EventChunk]:
    """Validated micro-batches covering at most ``chunk_rows`` rows each, malformed rows left out and
    passed to ``reject``.

    Files (parquet, csv, jsonl) are read and validated whole first; ``"-"`` reads JSON lines from stdin
    incrementally, validating each micro-batch (rows count lines, blank ones included).
    """
    if path == STDIN:
        yield from _stdin_chunks(stdin or sys.stdin, schema, chunk_rows, reject)
        return
    bad: list[BadRow] = []
    frame = read_interactions(path, schema=schema, bad_rows=bad)
    reject(bad, path)
    last_row = max([frame[ROW].max() or 0, *(b.row for b in bad)])
    for start in range(0, last_row, chunk_rows):
        chunk = frame.filter((pl.col(ROW) > start) & (pl.col(ROW) <= start + chunk_rows))
        if chunk.height:
            yield EventChunk(chunk, path)


def _stdin_chunks(stream: IO[str], schema: LogSchema, chunk_rows: int, reject: RejectRows) -> Iterator[EventChunk]:
    consumed = 0
    while True:
        lines = []
        while len(lines) < chunk_rows and (line := stream.readline()):
            lines.append(line.rstrip("\n"))
        if not lines:
            return
        bad: list[BadRow] = []
        frame = read_jsonl_lines(lines, schema=schema, file=STDIN_NAME, first_row=consumed + 1, bad_rows=bad)
        reject(bad, STDIN_NAME)
        consumed += len(lines)
        if frame.height:
            yield EventChunk(frame, STDIN_NAME)
