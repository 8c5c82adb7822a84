"""Where ``ksa-rec stream`` writes recommendations, with a position the state store commits.

A sink is written before the store commits; on restart it is cut back to the committed position, so
whatever a killed run wrote after its last commit disappears and is written again, once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq


class Sink(Protocol):
    position_key: str

    def restore(self, committed: str | None) -> None:
        """Drop everything written after the committed position (None: start empty)."""

    def write(self, records: list[dict]) -> str:
        """Append durably; returns the new position to commit."""


class JsonlSink:
    """One JSON object per line; the position is the file length in bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.position_key = f"sink:{self.path.resolve()}"

    def restore(self, committed: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.truncate(int(committed or 0))

    def write(self, records: list[dict]) -> str:
        with self.path.open("ab") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records).encode())
            f.flush()
            os.fsync(f.fileno())
            return str(f.tell())


class ParquetPartsSink:
    """A directory of ``part-NNNNNNNN.parquet`` files, one per micro-batch (each written to a temporary
    name and renamed); the position is the number of parts. Read it with ``pl.read_parquet(dir)``."""

    SCHEMA = pa.schema([("user_id", pa.string()), ("event_count", pa.int64()), ("row", pa.int64()),
                        ("item_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))])

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.position_key = f"sink:{self.path.resolve()}"
        self.parts = 0

    def restore(self, committed: str | None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.parts = int(committed or 0)
        for stale in self.path.glob("part-*.parquet*"):
            if stale.name.endswith(".tmp") or int(stale.name[5:13]) >= self.parts:
                stale.unlink()

    def write(self, records: list[dict]) -> str:
        table = pa.Table.from_pylist(records, schema=self.SCHEMA)
        final = self.path / f"part-{self.parts:08d}.parquet"
        tmp = final.with_name(final.name + ".tmp")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.parts += 1
        return str(self.parts)


def open_sink(path: str | Path) -> Sink:
    """``*.jsonl`` -> JSON lines file; anything else (e.g. ``out.parquet``) -> a directory of parts."""
    return JsonlSink(path) if str(path).endswith((".jsonl", ".json")) else ParquetPartsSink(path)
