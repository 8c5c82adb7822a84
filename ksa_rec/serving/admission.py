"""Which events of its input ``ksa-rec stream`` applies: exactly-once by event identity, and what happens
to bad events and unknown items.

An event's identity is an 8-byte blake2b of its raw item id, timestamp and feature values (in sorted
feature order); the user is implicit. Each user state remembers the identities and timestamps of its
newest ``REPLAY_WINDOW`` applied events (``UserState.recent_ids`` / ``recent_ts``), committed with the
rest of the state. Each incoming event is classified against its user's state and the user's earlier
events in the same input, in this order:

===============================================  ==========================================================
identity among the remembered events             replay: skipped and counted, never an error (``duplicate``
                                                 when this run applied the first copy)
timestamp >= the user's last applied timestamp   new: applied (equal: a same-second sibling)
timestamp <= the oldest remembered one, and the  beyond the replay horizon: assumed to be a replay of a
user has more events than are remembered         forgotten event; skipped and counted
otherwise                                        late: a bad event
===============================================  ==========================================================

So progress does not depend on the input's name or offsets: a restarted run reads its input from row 1
and recognises what it already applied, whatever the file is called or wherever a pipe restarts.

Bad events (a malformed row, a late event, a time gap that does not fit in int64) follow
``AdmissionConfig.on_bad_event``; item ids the checkpoint does not know follow ``on_unknown_item``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import polars as pl
import torch
from torch import Tensor

from ksa_rec.data.readers import BadRow
from ksa_rec.data.schema import ITEM, OOV_ID, ROW, TIME, USER
from ksa_rec.data.vocab import Vocab
from ksa_rec.errors import DataError
from ksa_rec.serving.state import UserState

REPLAY_WINDOW = 128
"""Applied events per user whose identities are remembered: how far back a replay is recognised."""

BadEventAction = Literal["error", "skip", "dead-letter"]
UnknownItemAction = Literal["oov", "skip", "error"]
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class AdmissionConfig:
    """How ``ksa-rec stream`` treats events it cannot apply as they are."""

    on_bad_event: BadEventAction = "error"
    """Malformed or late event: error (stop with one line), skip (count it), dead-letter (count and record it)."""
    dead_letter: Path | None = None
    """JSON lines file each rejected event is appended to (with on_bad_event dead-letter only)."""
    on_unknown_item: UnknownItemAction = "oov"
    """Item id the checkpoint lacks: oov (apply it as out-of-vocabulary), skip (count it only), error."""

    def __post_init__(self) -> None:
        if self.on_bad_event not in get_args(BadEventAction):
            raise ValueError(f"on_bad_event must be one of {', '.join(get_args(BadEventAction))}, "
                             f"got {self.on_bad_event!r}")
        if self.on_unknown_item not in get_args(UnknownItemAction):
            raise ValueError(f"on_unknown_item must be one of {', '.join(get_args(UnknownItemAction))}, "
                             f"got {self.on_unknown_item!r}")
        if (self.on_bad_event == "dead-letter") != (self.dead_letter is not None):
            raise ValueError("--dead-letter FILE and --on-bad-event dead-letter go together")


@dataclass
class StreamCounts:
    """What one ``stream`` run did with the events of its input."""

    applied: int = 0
    """Events applied to user states."""
    replayed: int = 0
    """Events skipped because an earlier run applied them (identity remembered)."""
    duplicate: int = 0
    """Exact copies of an event this run applied earlier, skipped."""
    beyond_horizon: int = 0
    """Events older than their user's replay window, skipped as assumed replays."""
    late: int = 0
    """Events older than their user's last applied event and not a replay (bad events)."""
    malformed: int = 0
    """Rows that are not a usable event: unreadable values, or a time gap beyond int64 (bad events)."""
    unknown_items: int = 0
    """Events with an item id the checkpoint does not know (applied as OOV unless skipped)."""
    unknown_categories: int = 0
    """Feature values of applied events that the checkpoint does not know (applied as OOV)."""
    users: int = 0
    """Users with at least one applied event."""

    def line(self) -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def event_identities(frame: pl.DataFrame, features: Sequence[str]) -> np.ndarray:
    """int64 ``[N]`` identity of each event of ``frame``: blake2b-64 of the JSON list [item id, timestamp,
    feature values in sorted feature order]."""
    columns = [frame[ITEM].to_list(), frame[TIME].to_list(), *[frame[name].to_list() for name in sorted(features)]]
    return np.fromiter((_identity(values) for values in zip(*columns)), dtype=np.int64, count=frame.height)


def _identity(values: tuple) -> int:
    text = json.dumps(values, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def time_gaps(old: list[UserState], lengths: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Seconds since each admitted event's predecessor (-1 for a user's first event ever); events grouped
    by user (``lengths`` per user, ``old`` their states before). Admission has already ensured that no
    gap is negative or beyond int64."""
    starts = np.cumsum(lengths) - lengths
    previous = np.concatenate([[0], timestamps[:-1]])
    has_previous = np.ones(len(timestamps), dtype=bool)
    for b, state in enumerate(old):
        if lengths[b]:
            previous[starts[b]], has_previous[starts[b]] = state.last_timestamp, state.event_count > 0
    return np.where(has_previous, timestamps - previous, -1)


@dataclass
class Admitted:
    """The events of a micro-batch to apply (input order) and their users' new replay windows."""

    frame: pl.DataFrame
    recent: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Per user with applied events: identities and timestamps of its newest applied events, oldest first."""

    def stamp(self, states: dict[str, UserState]) -> None:
        """Give the new states of the applied users their replay windows."""
        for user, (ids, ts) in self.recent.items():
            states[user].recent_ids, states[user].recent_ts = ids, ts


class _UserWindow:
    """One user's replay window while a micro-batch is classified."""

    def __init__(self, state: UserState, run_start: int):
        self.count, self.last_ts, self.run_start = state.event_count, state.last_timestamp, run_start
        # identity -> timestamp, oldest first (dicts keep insertion order)
        self.recent = dict(zip(state.recent_ids.tolist(), state.recent_ts.tolist()))
        self.changed = False

    def classify(self, identity: int, ts: int) -> str:
        if identity in self.recent:
            # The newest (count - run_start) remembered events are the ones this run applied.
            sequence = self.count - len(self.recent) + list(self.recent).index(identity)
            return "duplicate" if sequence >= self.run_start else "replayed"
        if self.count == 0 or ts >= self.last_ts:
            return "new"
        if self.recent and self.count > len(self.recent) and ts <= next(iter(self.recent.values())):
            return "beyond_horizon"
        return "late"

    def apply(self, identity: int, ts: int) -> None:
        self.recent[identity] = ts
        if len(self.recent) > REPLAY_WINDOW:
            del self.recent[next(iter(self.recent))]
        self.count, self.last_ts, self.changed = self.count + 1, ts, True

    def tensors(self) -> tuple[Tensor, Tensor]:
        return (torch.tensor(list(self.recent), dtype=torch.int64),
                torch.tensor(list(self.recent.values()), dtype=torch.int64))


class Admission:
    """One run's admission: classifies events (module docstring), applies the policies, counts."""

    def __init__(self, config: AdmissionConfig, items: Vocab, features: dict[str, Vocab]):
        self.config, self.items, self.features = config, items, features
        self.counts = StreamCounts()
        self._run_start: dict[str, int] = {}  # user -> its event count when this run first saw it
        self._users_applied: set[str] = set()
        self._dead_letters: list[dict] = []

    def reject_malformed(self, rows: list[BadRow], file: str) -> None:
        """Rows the reader could not turn into events (already left out of the input)."""
        for row in sorted(rows, key=lambda r: r.row):
            self._bad_event(row, file, "malformed")
        self._write_dead_letters()

    def admit(self, frame: pl.DataFrame, states: dict[str, UserState], file: str) -> Admitted:
        """The events of ``frame`` to apply. ``states`` holds every user of ``frame``. Raises ``DataError``
        (before anything is stored) on a bad event under the error policy or an unknown item under error."""
        identities = event_identities(frame, self.features).tolist()
        unknown_item = self.items.encode(frame[ITEM]) == OOV_ID
        keep = np.zeros(frame.height, dtype=bool)
        windows: dict[str, _UserWindow] = {}
        for i, (user, ts) in enumerate(zip(frame[USER].to_list(), frame[TIME].to_list())):
            window = windows.get(user)
            if window is None:
                run_start = self._run_start.setdefault(user, states[user].event_count)
                window = windows[user] = _UserWindow(states[user], run_start)
            verdict = window.classify(identities[i], ts)
            if verdict != "new":
                if verdict == "late":
                    self._bad_event(self._late(frame, i, window.last_ts), file, "late")
                else:
                    setattr(self.counts, verdict, getattr(self.counts, verdict) + 1)
                continue
            if unknown_item[i] and self.config.on_unknown_item != "oov":
                self._unknown_item(frame, i, file)
                continue
            if window.count and ts - window.last_ts > _INT64_MAX:
                self._bad_event(BadRow(frame[ROW][i], TIME, f"the time gap from the user's previous event "
                                       f"({window.last_ts}) to {ts} does not fit in int64",
                                       _raw_event(frame, i)), file, "malformed")
                continue
            window.apply(identities[i], ts)
            keep[i] = True
        self._write_dead_letters()
        self._count_applied(frame, keep, unknown_item)
        applied = {user: w.tensors() for user, w in windows.items() if w.changed}
        self._users_applied.update(applied)
        self.counts.users = len(self._users_applied)
        return Admitted(frame if keep.all() else frame.filter(pl.Series(keep)), applied)

    def _count_applied(self, frame: pl.DataFrame, keep: np.ndarray, unknown_item: np.ndarray) -> None:
        self.counts.applied += int(keep.sum())
        self.counts.unknown_items += int((keep & unknown_item).sum())
        for name, vocab in self.features.items():
            values = frame[name]
            unknown = vocab.encode(values) == OOV_ID
            if values.null_count():  # a null is no unknown category (is_not_null costs a polars query)
                unknown &= values.is_not_null().to_numpy()
            self.counts.unknown_categories += int((keep & unknown).sum())

    def _late(self, frame: pl.DataFrame, i: int, last_ts: int) -> BadRow:
        return BadRow(frame[ROW][i], TIME, f"timestamp {frame[TIME][i]} is before the user's previous event "
                      f"({last_ts}); events of a user must arrive in time order (--on-bad-event skip or "
                      "dead-letter lets the stream go on)", _raw_event(frame, i))

    def _unknown_item(self, frame: pl.DataFrame, i: int, file: str) -> None:
        if self.config.on_unknown_item == "error":
            raise DataError(f"unknown item id {frame[ITEM][i]!r}: the checkpoint's vocabulary does not have it "
                            "(--on-unknown-item oov or skip lets the stream go on)", file=file,
                            row=frame[ROW][i], column=ITEM)
        self.counts.unknown_items += 1

    def _bad_event(self, row: BadRow, file: str, kind: Literal["late", "malformed"]) -> None:
        if self.config.on_bad_event == "error":
            raise row.error(file)
        setattr(self.counts, kind, getattr(self.counts, kind) + 1)
        if self.config.dead_letter is not None:
            self._dead_letters.append({"file": file, "row": row.row, "column": row.column, "kind": kind,
                                       "reason": row.problem, "raw": row.raw})

    def _write_dead_letters(self) -> None:
        # Appended and synced before the micro-batch that rejected them commits.
        if not self._dead_letters:
            return
        path = self.config.dead_letter
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(record) + "\n" for record in self._dead_letters))
            f.flush()
            os.fsync(f.fileno())
        self._dead_letters.clear()


def _raw_event(frame: pl.DataFrame, i: int) -> str:
    """An admitted row as JSON (its input line is no longer at hand)."""
    return json.dumps({k: v for k, v in frame.row(i, named=True).items() if k != ROW})
