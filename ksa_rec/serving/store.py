"""Where user states live between micro-batches.

``StateStore`` is the small interface ``stream`` and ``serve`` need (claim users, batched get, one atomic
commit of states plus bookkeeping, scan for batch scoring). Two implementations, chosen by ``open_store``
from the ``--state`` value:

- ``SqliteStateStore`` (a path): one SQLite file in WAL mode, no server, one writer process per store.
- ``RedisStateStore`` (``redis://host:port/db``, ``ksa_rec.serving.redis_store``): several writer
  processes share one Redis; each claims the users of a micro-batch before reading them.

Both give the same guarantee: everything passed to one ``commit`` becomes visible together or not at all,
and a writer only ever commits users it read under its own claim.

SQLite, one writer per store: a writer holds an exclusive ``flock`` on ``<store>.lock`` for its whole life (the
OS drops it when the process dies, so ``kill -9`` leaves no stale lock); the file names the holder.
Readers (``ksa-rec score --state``) open the database read-only and take no lock (WAL lets them read
while a writer commits).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from ksa_rec.errors import StateError

STORE_FORMAT = "ksa_rec.state_store.v2"
FORMAT_KEY = "format"
_TABLES = {"states", "meta"}


class StateStore(Protocol):
    def claim(self, user_ids: list[str]) -> None:
        """Hold these users for this writer until the next ``commit`` or ``release``: no other writer changes
        them meanwhile (a no-op where the whole store has one writer). Blocks while another holds one."""

    def release(self) -> None:
        """Give up the current claim without committing (a micro-batch that applied nothing or failed)."""

    def get_many(self, user_ids: list[str]) -> dict[str, bytes]:
        """Blobs of the users that have one (absent users are new)."""

    def commit(self, states: dict[str, bytes], meta: dict[str, str]) -> None:
        """Write states and bookkeeping (sink position, model id) in one transaction; ends the claim."""

    def meta(self) -> dict[str, str]:
        """The bookkeeping of the last commit ({} for a new store)."""

    def scan(self, batch_size: int) -> Iterator[list[tuple[str, bytes]]]:
        """Every (user_id, blob), in batches (ordered by user id)."""

    def close(self) -> None:
        """Release the store (its locks, its connection)."""


def is_redis_url(spec: str | Path) -> bool:
    return str(spec).startswith(("redis://", "rediss://", "unix://"))


def open_store(spec: str | Path, *, read_only: bool = False) -> StateStore:
    """The store a ``--state`` value names: ``redis://host:port/db`` (also rediss://, unix://) is Redis,
    anything else a SQLite file. ``read_only``: an existing store, opened for reading (``score``)."""
    if is_redis_url(spec):
        from ksa_rec.serving.redis_store import RedisStateStore

        return RedisStateStore(str(spec), read_only=read_only)
    return SqliteStateStore(spec, read_only=read_only)


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``<store>.lock``, holding the owner's pid and start time."""

    def __init__(self, store: Path):
        self.path = store.with_name(store.name + ".lock")
        try:
            # Opened without truncating: the holder's line must survive a refused attempt.
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StateError(f"{store}: cannot create the lock file {self.path} ({err.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "a process that is starting"
            os.close(self.fd)
            raise StateError(f"{store}: another ksa-rec stream or serve is writing to this store ({holder}); "
                             "one writer per store") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor drops the flock


class SqliteStateStore:
    """States keyed by the raw user id in ``states(user_id TEXT PRIMARY KEY, state BLOB)``; bookkeeping in
    ``meta(key, value)``. WAL mode with ``synchronous=FULL``: a commit survives a killed process.

    ``read_only``: open an existing store for reading (no lock, nothing created); otherwise take the
    writer lock and create the store if the file is new. Any SQLite failure, at open or later (a corrupt
    page deep in the file), is a one-line ``StateError``."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path)
        self.lock = None
        if read_only:
            if not self.path.is_file():
                raise StateError(f"{self.path}: no such state store")
        else:
            self.lock = WriterLock(self.path)
        try:
            with self._sqlite_errors():
                self.db = self._connect(read_only)
                self._check_format(read_only)
        except BaseException:
            self.close()
            raise

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        if read_only:
            return sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True,
                                   isolation_level=None)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _check_format(self, read_only: bool) -> None:
        tables = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and not read_only:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("CREATE TABLE states (user_id TEXT PRIMARY KEY, state BLOB NOT NULL)")
            self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("INSERT INTO meta VALUES (?, ?)", (FORMAT_KEY, STORE_FORMAT))
            self.db.execute("COMMIT")
            return
        if not _TABLES <= tables:
            raise StateError(f"{self.path}: not a ksa-rec state store (tables: {', '.join(sorted(tables)) or 'none'})")
        found = self.meta().get(FORMAT_KEY)
        if found != STORE_FORMAT:
            raise StateError(f"{self.path}: state store format {found or 'v1'!r}, this version reads "
                             f"{STORE_FORMAT!r}; rebuild it: stream the events again into a new --state")

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as err:
            raise StateError(f"{self.path}: not a usable state store ({err}); restore it from a backup or "
                             "rebuild it") from None

    def claim(self, user_ids: list[str]) -> None:
        """Nothing to do: the writer lock already makes this process the store's only writer."""

    def release(self) -> None:
        pass

    def get_many(self, user_ids: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        with self._sqlite_errors():
            for start in range(0, len(user_ids), 500):  # SQLite's bound-parameter limit
                chunk = user_ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                out.update(self.db.execute(f"SELECT user_id, state FROM states WHERE user_id IN ({marks})", chunk))
        return out

    def commit(self, states: dict[str, bytes], meta: dict[str, str]) -> None:
        with self._sqlite_errors():
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
        with self._sqlite_errors():
            return dict(self.db.execute("SELECT key, value FROM meta"))

    def scan(self, batch_size: int) -> Iterator[list[tuple[str, bytes]]]:
        with self._sqlite_errors():
            cursor = self.db.execute("SELECT user_id, state FROM states ORDER BY user_id")
            while rows := cursor.fetchmany(batch_size):
                yield rows

    def __len__(self) -> int:
        with self._sqlite_errors():
            return self.db.execute("SELECT COUNT(*) FROM states").fetchone()[0]

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
