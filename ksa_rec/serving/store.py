"""Where user states live between micro-batches.

``StateStore`` is the small interface the streaming job needs (batched get, one atomic commit of states
plus bookkeeping, scan for batch scoring); ``SqliteStateStore`` implements it in one SQLite file in WAL
mode, no server. A shared store (Redis, a KV service) replaces it by implementing the same four methods
with the same atomicity: everything passed to one ``commit`` becomes visible together or not at all.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ksa_rec.errors import StateError


class StateStore(Protocol):
    def get_many(self, user_ids: list[str]) -> dict[str, bytes]:
        """Blobs of the users that have one (absent users are new)."""

    def commit(self, states: dict[str, bytes], meta: dict[str, str]) -> None:
        """Write states and bookkeeping (input position, sink length, model id) in one transaction."""

    def meta(self) -> dict[str, str]:
        """The bookkeeping of the last commit ({} for a new store)."""

    def scan(self, batch_size: int) -> Iterator[list[tuple[str, bytes]]]:
        """Every (user_id, blob), in batches."""


class SqliteStateStore:
    """States keyed by the raw user id in ``states(user_id TEXT PRIMARY KEY, state BLOB)``; bookkeeping in
    ``meta(key, value)``. WAL mode with ``synchronous=FULL``: a commit survives a killed process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS states (user_id TEXT PRIMARY KEY, state BLOB NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        except sqlite3.DatabaseError as err:
            raise StateError(f"{self.path}: not a usable state store ({err})") from None

    def get_many(self, user_ids: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for start in range(0, len(user_ids), 500):  # SQLite's bound-parameter limit
            chunk = user_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self.db.execute(f"SELECT user_id, state FROM states WHERE user_id IN ({marks})", chunk))
        return out

    def commit(self, states: dict[str, bytes], meta: dict[str, str]) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO states VALUES (?, ?)", states.items())
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def scan(self, batch_size: int) -> Iterator[list[tuple[str, bytes]]]:
        cursor = self.db.execute("SELECT user_id, state FROM states ORDER BY user_id")
        while rows := cursor.fetchmany(batch_size):
            yield rows

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM states").fetchone()[0]

    def close(self) -> None:
        self.db.close()
