"""Raw string id <-> dense int id, with padding and out-of-vocabulary ids reserved.

Dense ids: ``PAD = 0`` (padding, never a real value), ``OOV = 1`` (unknown or missing value), real
values ``2 .. len(vocab) - 1`` in the order they were first seen. Example, built from ``b a b c``::

    raw  | <pad> <oov> b a c
    id   |   0     1   2 3 4
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl

from ksa_rec.data.schema import OOV_ID, RESERVED_IDS
from ksa_rec.errors import DataError

_DICT_KIND = "ksa_rec.Vocab"
_DICT_VERSION = 1
_FEW = 1024
"""encode() looks up at most this many values one by one (cheaper than hashing the vocabulary)."""


class Vocab:
    """An immutable raw-id vocabulary; ``raw_ids[i]`` has dense id ``i + 2``."""

    def __init__(self, raw_ids: pl.Series | Sequence[str]):
        raw = pl.Series("raw", raw_ids, dtype=pl.String)
        if raw.null_count():
            raise ValueError("a vocabulary cannot hold a null id")
        if raw.is_duplicated().any():
            repeated = raw.filter(raw.is_duplicated())[0]
            raise ValueError(f"vocabulary ids must be unique; repeated: {repeated!r}")
        self._raw = raw

    @classmethod
    def build(cls, values: pl.Series) -> Vocab:
        """Vocabulary of the distinct non-null ``values``, in order of first appearance (deterministic)."""
        return cls(values.cast(pl.String).drop_nulls().unique(maintain_order=True))

    @property
    def raw_ids(self) -> pl.Series:
        """``[len(self) - 2]`` raw ids in dense-id order (dense id = index + 2)."""
        return self._raw

    def encode(self, values: pl.Series | Sequence[str]) -> np.ndarray:
        """Raw ids ``[N]`` -> int64 dense ids ``[N]``; unknown or null -> ``OOV``. One hash join, or for
        a few values (a serving micro-batch) lookups in a dict built once: the join hashes the whole
        vocabulary on every call."""
        series = values if isinstance(values, pl.Series) else pl.Series(values, dtype=pl.String)
        if series.len() <= _FEW:
            index = self._index
            return np.fromiter((index.get(v, OOV_ID) for v in series.cast(pl.String).to_list()), dtype=np.int64,
                               count=series.len())
        dense = pl.int_range(RESERVED_IDS, len(self), dtype=pl.Int64, eager=True)
        encoded = series.cast(pl.String).replace_strict(self._raw, dense, default=OOV_ID,
                                                         return_dtype=pl.Int64)
        return encoded.fill_null(OOV_ID).to_numpy(writable=True)

    def decode(self, ids: np.ndarray | Sequence[int]) -> list[str | None]:
        """Dense ids ``[N]`` -> raw ids; ``PAD``/``OOV`` -> ``None``. Out-of-range ids raise IndexError."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self)):
            bad = arr[(arr < 0) | (arr >= len(self))][0]
            raise IndexError(f"id {bad} is outside this vocabulary of {len(self)} ids (0 .. {len(self) - 1})")
        real = arr >= RESERVED_IDS
        if not real.any():
            return [None] * arr.size
        out = self._raw.gather(np.where(real, arr - RESERVED_IDS, 0))
        return out.scatter(np.flatnonzero(~real), None).to_list()

    def __len__(self) -> int:
        """Number of dense ids, including the two reserved ones (an embedding table's row count)."""
        return self._raw.len() + RESERVED_IDS

    def __contains__(self, raw: object) -> bool:
        return raw in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._raw.equals(other._raw)

    def __repr__(self) -> str:
        return f"Vocab({len(self) - RESERVED_IDS} ids + {RESERVED_IDS} reserved)"

    @cached_property
    def _index(self) -> dict[str, int]:
        # Membership tests and encode() of a few values; bulk lookups join.
        return {raw: i + RESERVED_IDS for i, raw in enumerate(self._raw.to_list())}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``{"kind", "version", "ids"}`` with ids in dense-id order."""
        return {"kind": _DICT_KIND, "version": _DICT_VERSION, "ids": self._raw.to_list()}

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None) -> Vocab:
        """Inverse of ``to_dict``. Raises ``DataError`` (naming ``source``, e.g. the json file) on
        anything that is not a valid vocabulary."""
        def corrupt(problem: str) -> DataError:
            return DataError(f"corrupt vocabulary: {problem}", file=source)

        if not isinstance(d, dict):
            raise corrupt(f"expected a JSON object, got {type(d).__name__}")
        if d.get("kind") != _DICT_KIND:
            raise corrupt(f"'kind' is {d.get('kind')!r}, expected {_DICT_KIND!r}")
        if d.get("version") != _DICT_VERSION:
            raise corrupt(f"'version' is {d.get('version')!r}, this code reads version {_DICT_VERSION}")
        ids = d.get("ids")
        if not isinstance(ids, list):
            raise corrupt("'ids' must be a list of strings")
        not_str = next((i for i, v in enumerate(ids) if not isinstance(v, str)), None)
        if not_str is not None:
            raise corrupt(f"ids[{not_str}] is {ids[not_str]!r}, not a string")
        try:
            return cls(ids)
        except ValueError as err:
            raise corrupt(str(err)) from err
