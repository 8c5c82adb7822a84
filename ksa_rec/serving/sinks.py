"""Where ``ksa-rec stream`` writes recommendations, with a position the state store commits.

A sink is written before the store commits; at its first write of a run it is cut back to the committed
position, so whatever a killed run wrote after its last commit disappears and is written again, once.

Outputs are never destroyed by surprise. Opening a sink only checks (it changes nothing): an existing
output the store has no committed position for, or one shorter than what the store committed (changed
outside ksa-rec), is refused unless ``overwrite``. Nothing is created or cut back before the first
micro-batch has been admitted, so a run that fails on its input leaves the output as it was.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from ksa_rec.errors import KsaRecError


class OutputError(KsaRecError, ValueError):
    """An output that cannot be written without destroying something."""


class Sink(Protocol):
    position_key: str

    def write(self, records: list[dict]) -> str:
        """Append durably (the first call first cuts back to the committed position); returns the new
        position to commit."""


def position_key(path: str | Path) -> str:
    """The store's meta key for an output's committed position."""
    return f"sink:{Path(path).resolve()}"


def open_sink(path: str | Path, committed: str | None, overwrite: bool = False) -> Sink:
    """``*.jsonl`` -> JSON lines file; anything else (e.g. ``out.parquet``) -> a directory of parts.
    ``committed``: the store's position for this output (None: it never wrote it)."""
    sink = JsonlSink if str(path).endswith((".jsonl", ".json")) else ParquetPartsSink
    return sink(path, committed, overwrite)


def _refuse_unknown(path: Path) -> OutputError:
    return OutputError(f"{path}: exists and this state store has no record of writing it; pass --overwrite "
                       "to replace it, or choose another --output")


def _refuse_changed(path: Path, found: str, committed: str) -> OutputError:
    return OutputError(f"{path}: holds {found} but the state store committed {committed}, so it was changed "
                       "outside ksa-rec stream; pass --overwrite to start it again, or choose another --output")


class JsonlSink:
    """One JSON object per line; the position is the file length in bytes."""

    def __init__(self, path: str | Path, committed: str | None, overwrite: bool = False):
        self.path = Path(path)
        self.position_key = position_key(path)
        if self.path.is_dir():
            raise OutputError(f"{self.path}: is a directory; a .jsonl output is a file")
        size = self.path.stat().st_size if self.path.exists() else 0
        if committed is not None and size >= int(committed):
            self.start = int(committed)
        elif overwrite or (committed is None and size == 0):
            self.start = 0
        elif committed is None:
            raise _refuse_unknown(self.path)
        else:
            raise _refuse_changed(self.path, f"{size} bytes", f"{committed} bytes")
        self.restored = False

    def write(self, records: list[dict]) -> str:
        if not self.restored:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:
                f.truncate(self.start)
            self.restored = True
        with self.path.open("ab") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records).encode())
            f.flush()
            os.fsync(f.fileno())
            return str(f.tell())


class ParquetPartsSink:
    """A directory of ``ksa-rec-part-NNNNNNNN.parquet`` files, one per micro-batch (each written to a
    temporary name and renamed); the position is the number of parts. Only files matching that pattern
    exactly are ever touched: others (Spark's ``_SUCCESS``, its own part files) stay as they are. Read the
    output with ``pl.read_parquet(f"{dir}/ksa-rec-part-*.parquet")``."""

    PART = re.compile(r"ksa-rec-part-(\d{8,})\.parquet(\.tmp)?")
    SCHEMA = pa.schema([("user_id", pa.string()), ("event_count", pa.int64()), ("row", pa.int64()),
                        ("item_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))])

    def __init__(self, path: str | Path, committed: str | None, overwrite: bool = False):
        self.path = Path(path)
        self.position_key = position_key(path)
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path}: not a directory; a parquet output is a directory of parts "
                              "(or name a .jsonl file)")
        entries = list(self.path.iterdir()) if self.path.is_dir() else []
        parts = {int(m.group(1)) for e in entries if (m := self.PART.fullmatch(e.name)) and not m.group(2)}
        if committed is not None and set(range(int(committed))) <= parts:
            self.parts = int(committed)
        elif overwrite or (committed is None and not entries):
            self.parts = 0
        elif committed is None:
            raise _refuse_unknown(self.path)
        else:
            raise _refuse_changed(self.path, f"{len(parts)} of our parts", f"{committed} parts")
        self.restored = False

    def _name(self, index: int) -> str:
        return f"ksa-rec-part-{index:08d}.parquet"

    def _restore(self) -> None:
        """Remove our temporary files and our parts at or after the committed count; nothing else."""
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in self.path.iterdir():
            match = self.PART.fullmatch(entry.name)
            if match and (match.group(2) or int(match.group(1)) >= self.parts):
                entry.unlink()
        self.restored = True

    def write(self, records: list[dict]) -> str:
        if not self.restored:
            self._restore()
        table = pa.Table.from_pylist(records, schema=self.SCHEMA)
        final = self.path / self._name(self.parts)
        tmp = final.with_name(final.name + ".tmp")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.parts += 1
        return str(self.parts)
