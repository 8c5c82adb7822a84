"""Interaction log -> compact per-user arrays (values + offsets) + vocabularies, with an on-disk cache.

``load_interactions(cfg)``: read -> validate -> duplicates (error/drop/keep) -> drop users with fewer
than ``min_user_events`` events -> stable sort by (user, timestamp) with file order kept on ties ->
vocabularies -> arrays. Users keep the order of their first appearance in the file, so row ``u`` of
``offsets`` is the user with dense id ``u + 2`` (``users.raw_ids[u]``). Example, 2 users::

    user (row u)  | u0: 3 events | u1: 1 event |
    item_ids      | 2  3  2      | 4           |
    offsets       | 0            3             4
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import polars as pl

from ksa_rec.data.readers import FORMATS, Format, read_interactions
from ksa_rec.data.schema import ITEM, OOV_ID, RESERVED_IDS, ROW, TIME, USER, LogSchema
from ksa_rec.data.vocab import Vocab
from ksa_rec.errors import DataError

logger = logging.getLogger(__name__)

#: Bump whenever the processed output or the on-disk layout changes: old caches then miss.
ETL_FORMAT_VERSION = 1
_SAVED_KIND = "ksa_rec.InteractionData"

DuplicatePolicy = Literal["error", "drop", "keep"]


@dataclass
class EtlConfig:
    """Where the log is and how to turn it into ``InteractionData`` (YAML mirrors these fields)."""

    path: str
    """The interaction log (parquet / csv / jsonl, MovieLens u.data / ratings.dat / ratings.csv, SASRec .txt)."""
    format: Format = "auto"
    """How to read ``path``; auto decides from the file name and header."""
    schema: LogSchema = field(default_factory=LogSchema)
    """Column names, and which side features and labels to keep."""
    min_user_events: int = 1
    """Users with fewer events are dropped."""
    on_duplicate: DuplicatePolicy = "error"
    """Exact duplicate (user, item, timestamp) rows: error (``DataError`` naming both), drop (keep the first)
    or keep."""
    cache_dir: str | None = ".cache/ksa_rec"
    """Processed copies, keyed by the file's absolute path, size, mtime and every setting here that changes
    the output (relative to the working directory); None: no cache."""

    def __post_init__(self) -> None:
        if isinstance(self.schema, dict):  # a plain dict from YAML or json
            self.schema = LogSchema(**self.schema)
        if self.format not in FORMATS:
            raise ValueError(f"EtlConfig.format must be one of {FORMATS}, got {self.format!r}")
        if self.on_duplicate not in get_args(DuplicatePolicy):
            raise ValueError(f"EtlConfig.on_duplicate must be one of {get_args(DuplicatePolicy)}, "
                             f"got {self.on_duplicate!r}")
        if not isinstance(self.min_user_events, int) or self.min_user_events < 1:
            raise ValueError(f"EtlConfig.min_user_events must be an integer >= 1, "
                             f"got {self.min_user_events!r}")


@dataclass(eq=False)
class InteractionData:
    """Processed interactions, jagged by user (``N`` events, ``U`` users).

    Row ``u`` of ``offsets`` is the user with dense id ``u + 2`` in ``users``; that user owns events
    ``offsets[u]:offsets[u+1]``, oldest first. ``from_cache`` says whether ``load_interactions`` read
    this from its cache instead of the raw file.
    """

    users: Vocab
    items: Vocab
    features: dict[str, Vocab]
    offsets: np.ndarray                    # int64 [U+1], offsets[0] == 0, offsets[-1] == N
    item_ids: np.ndarray                   # int64 [N], dense item ids (>= 2)
    timestamps: np.ndarray                 # int64 [N], non-decreasing within each user
    feature_ids: dict[str, np.ndarray]     # name -> int64 [N], dense ids (OOV = 1 for a missing value)
    labels: dict[str, np.ndarray]          # name -> int64 [N], carried through untouched
    from_cache: bool = False

    @property
    def num_users(self) -> int:
        """``U``, real users (rows of ``offsets``); the user vocab has ``U + 2`` ids."""
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        """Item embedding table size: real items + the 2 reserved ids."""
        return len(self.items)

    @property
    def num_events(self) -> int:
        return len(self.item_ids)

    def lengths(self) -> np.ndarray:
        """int64 ``[U]`` events per user."""
        return np.diff(self.offsets)

    def validate(self, *, file: str | None = None) -> None:
        """Raise ``DataError`` (naming ``file``) unless every array and vocabulary is consistent."""
        def bad(problem: str) -> DataError:
            return DataError(problem, file=file)

        arrays = {"offsets": self.offsets, "item_ids": self.item_ids, "timestamps": self.timestamps,
                  **{f"feature_ids[{k!r}]": v for k, v in self.feature_ids.items()},
                  **{f"labels[{k!r}]": v for k, v in self.labels.items()}}
        for name, arr in arrays.items():
            if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 or arr.ndim != 1:
                raise bad(f"{name} must be a 1-D int64 array, got {getattr(arr, 'dtype', type(arr))} "
                          f"{getattr(arr, 'shape', '')}")
        offsets, n = self.offsets, self.num_events
        if len(offsets) != len(self.users) - RESERVED_IDS + 1:
            raise bad(f"offsets has {len(offsets)} entries for "
                      f"{len(self.users) - RESERVED_IDS} users")
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise bad(f"offsets must rise monotonically from 0 to {n} events")
        for name, arr in arrays.items():
            if name != "offsets" and len(arr) != n:
                raise bad(f"{name} has {len(arr)} entries, expected {n} events")
        if n and (self.item_ids.min() < RESERVED_IDS or self.item_ids.max() >= len(self.items)):
            raise bad(f"item_ids outside [{RESERVED_IDS}, {len(self.items)})")
        if set(self.features) != set(self.feature_ids):
            raise bad(f"feature vocabularies {sorted(self.features)} do not match "
                      f"feature_ids {sorted(self.feature_ids)}")
        for name, ids in self.feature_ids.items():
            if n and (ids.min() < OOV_ID or ids.max() >= len(self.features[name])):
                raise bad(f"feature_ids[{name!r}] outside [{OOV_ID}, {len(self.features[name])})")
        # A decrease is allowed only where a new user starts.
        drops = np.flatnonzero(np.diff(self.timestamps) < 0) + 1
        if not np.isin(drops, offsets).all():
            raise bad("timestamps decrease within a user")

    def save(self, directory: str | Path) -> None:
        """Write to ``directory`` (replacing it) atomically: everything goes to a temporary sibling
        that is renamed into place, so a crash never leaves a half-written directory behind."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self._write(tmp)
            _move_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename

    def _write(self, directory: Path) -> None:
        names_f, names_l = list(self.features), list(self.labels)
        arrays = {"offsets": self.offsets, "item_ids": self.item_ids, "timestamps": self.timestamps,
                  **{f"feature_{i}": self.feature_ids[k] for i, k in enumerate(names_f)},
                  **{f"label_{i}": self.labels[k] for i, k in enumerate(names_l)}}
        for name, arr in arrays.items():
            np.save(directory / f"{name}.npy", arr, allow_pickle=False)
        vocabs = {"users": self.users, "items": self.items,
                  **{f"feature_{i}": self.features[k] for i, k in enumerate(names_f)}}
        for name, vocab in vocabs.items():
            (directory / f"vocab_{name}.json").write_text(json.dumps(vocab.to_dict()))
        meta = {"kind": _SAVED_KIND, "version": ETL_FORMAT_VERSION, "num_users": self.num_users,
                "num_events": self.num_events, "features": names_f, "labels": names_l}
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> InteractionData:
        """Read what ``save`` wrote; ``DataError`` naming the bad file on any corruption or version
        mismatch."""
        directory = Path(directory)
        meta = _read_json(directory / "meta.json")
        meta_file = str(directory / "meta.json")
        if not isinstance(meta, dict) or meta.get("kind") != _SAVED_KIND:
            raise DataError("not a saved InteractionData (wrong or missing 'kind')", file=meta_file)
        if meta.get("version") != ETL_FORMAT_VERSION:
            raise DataError(f"format version {meta.get('version')!r}, this code reads {ETL_FORMAT_VERSION}",
                            file=meta_file)
        names_f, names_l = meta.get("features"), meta.get("labels")
        if not (isinstance(names_f, list) and isinstance(names_l, list)
                and all(isinstance(n, str) for n in names_f + names_l)):
            raise DataError("'features' and 'labels' must be lists of names", file=meta_file)

        def vocab(name: str) -> Vocab:
            path = directory / f"vocab_{name}.json"
            return Vocab.from_dict(_read_json(path), source=str(path))

        data = cls(users=vocab("users"), items=vocab("items"),
                   features={k: vocab(f"feature_{i}") for i, k in enumerate(names_f)},
                   offsets=_read_npy(directory / "offsets.npy"),
                   item_ids=_read_npy(directory / "item_ids.npy"),
                   timestamps=_read_npy(directory / "timestamps.npy"),
                   feature_ids={k: _read_npy(directory / f"feature_{i}.npy") for i, k in enumerate(names_f)},
                   labels={k: _read_npy(directory / f"label_{i}.npy") for i, k in enumerate(names_l)})
        if (data.num_users, data.num_events) != (meta.get("num_users"), meta.get("num_events")):
            raise DataError(f"arrays hold {data.num_users} users / {data.num_events} events, meta.json says "
                            f"{meta.get('num_users')} / {meta.get('num_events')}", file=meta_file)
        data.validate(file=str(directory))
        return data


def build_interactions(frame: pl.DataFrame, *, schema: LogSchema = LogSchema(), min_user_events: int = 1,
                       on_duplicate: DuplicatePolicy = "error", file: str | None = None,
                       items: Vocab | None = None, features: dict[str, Vocab] | None = None) -> InteractionData:
    """``read_interactions``'s frame -> ``InteractionData`` (no I/O; ``file`` only names errors).

    ``items``/``features``: encode with these vocabularies (a trained model's; unknown ids -> OOV)
    instead of building new ones."""
    keys = [USER, ITEM, TIME]
    if on_duplicate == "error":
        first = pl.col(ROW).min().over(keys)
        dup = frame.lazy().with_columns(first.alias("__first")).filter(pl.col("__first") != pl.col(ROW)) \
                   .head(1).collect()
        if dup.height:
            raise DataError(f"duplicate of row {dup['__first'][0]} (user {dup[USER][0]!r}, item "
                            f"{dup[ITEM][0]!r}, timestamp {dup[TIME][0]}); set on_duplicate to 'drop' or "
                            f"'keep' to accept duplicates", file=file, row=int(dup[ROW][0]))
    elif on_duplicate == "drop":
        frame = frame.unique(subset=keys, keep="first", maintain_order=True)
    if min_user_events > 1:
        frame = frame.filter(pl.len().over(USER) >= min_user_events)
    if frame.height == 0:
        raise DataError(f"no user has at least {min_user_events} events", file=file)
    # Sort by (first position of the user, timestamp, position): positions are unique, so this total
    # order is a stable sort by (user, timestamp) -- file order on ties -- and users keep file order.
    ordered = (frame.with_row_index("__pos")
               .with_columns(pl.col("__pos").min().over(USER).alias("__first"))
               .sort(["__first", TIME, "__pos"]))
    lengths = ordered["__first"].rle().struct.field("len").cast(pl.Int64).to_numpy()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = items or Vocab.build(ordered[ITEM])
    features = features or {name: Vocab.build(ordered[name]) for name in schema.features}
    return InteractionData(
        users=Vocab.build(ordered[USER]), items=items, features=features, offsets=offsets,
        item_ids=items.encode(ordered[ITEM]),
        timestamps=ordered[TIME].to_numpy(writable=True),
        feature_ids={name: features[name].encode(ordered[name]) for name in schema.features},
        labels={name: ordered[name].to_numpy(writable=True) for name in schema.labels})


def cache_location(cfg: EtlConfig) -> Path | None:
    """Directory ``load_interactions`` caches ``cfg``'s result in (``None`` if caching is off)."""
    if cfg.cache_dir is None:
        return None
    path = Path(cfg.path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror or err}", file=cfg.path) from err
    payload = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": cfg.format,
               "schema": asdict(cfg.schema), "min_user_events": cfg.min_user_events,
               "on_duplicate": cfg.on_duplicate, "version": ETL_FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cfg.cache_dir).expanduser() / f"{path.stem}-{digest}"


def load_interactions(cfg: EtlConfig) -> InteractionData:
    """Processed interactions for ``cfg``: from the cache when a valid entry exists, else from the raw
    file (then cached). A corrupt cache entry raises ``DataError`` saying which directory to delete."""
    location = cache_location(cfg)
    if location is not None and location.exists():
        try:
            data = InteractionData.load(location)
        except DataError as err:
            raise DataError(f"{err.problem} (corrupt cache entry: delete {location} to rebuild it)",
                            file=err.file, row=err.row, column=err.column) from err
        data.from_cache = True
        logger.info("loaded cached interactions (%d users, %d events) from %s",
                    data.num_users, data.num_events, location)
        return data
    frame = read_interactions(cfg.path, format=cfg.format, schema=cfg.schema)
    data = build_interactions(frame, schema=cfg.schema, min_user_events=cfg.min_user_events,
                              on_duplicate=cfg.on_duplicate, file=cfg.path)
    if location is not None:
        data.save(location)
        logger.info("cached interactions (%d users, %d events) of %s in %s",
                    data.num_users, data.num_events, cfg.path, location)
    return data


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first, then deleted."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    os.rename(tmp, target)
    shutil.rmtree(aside, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read JSON: {err}", file=str(path)) from err


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read array: {err}", file=str(path)) from err
    if arr.dtype != np.int64 or arr.ndim != 1:
        raise DataError(f"expected a 1-D int64 array, got {arr.dtype} {arr.shape}", file=str(path))
    return arr
