"""Which columns of an interaction log mean what, and the column names every reader outputs.

A reader maps the file's own column names (``LogSchema``) onto one fixed output layout::

    row | user_id | item_id | timestamp | <features...> | <labels...>
    i64 | str     | str     | i64       | str ...       | i64 ...

``row`` is the 1-based data row in the file (line number for line formats) and exists only so that
later stages can name the offending row in an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ksa_rec.utils.config import require

USER = "user_id"
ITEM = "item_id"
TIME = "timestamp"
ROW = "row"
TIME_GAP = "time_gap"
"""Key of the log2-bucketed time gap in a batch's KeyedJaggedTensor (computed, not read from a file)."""

PAD_ID, OOV_ID = 0, 1
"""Dense ids every vocabulary reserves: padding, and an unknown or missing value."""
RESERVED_IDS = 2
"""Dense ids below this are never real items (PAD, OOV): never targets, never recommended."""
#: Output names a feature or label column may not take (they would overwrite a required column).
RESERVED_OUTPUT_NAMES = (USER, ITEM, TIME, ROW)


@dataclass(frozen=True)
class LogSchema:
    """Column names of an interaction log.

    ``user_col``/``item_col``/``time_col`` name the file's columns; the reader renames them to
    ``user_id``/``item_id``/``timestamp``. ``features`` are optional categorical side features (kept
    under their own names as strings, e.g. ``("category", "action")``); ``labels`` are optional
    integer per-event columns carried through untouched (not model inputs, e.g.
    ``("evidence_distance",)``). Formats without a header (``ml-100k``, ``ml-dat``, ``sasrec``) ignore
    the three column names; MovieLens files offer ``rating`` as a feature.
    """

    user_col: str = USER
    item_col: str = ITEM
    time_col: str = TIME
    features: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # YAML gives lists; a bare string would silently become a tuple of characters.
        for name in ("features", "labels"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"LogSchema.{name} must be a list of column names, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        names = [self.user_col, self.item_col, self.time_col, *self.features, *self.labels]
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"LogSchema column names must be non-empty strings, got {name!r}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"LogSchema names a column more than once: {', '.join(repeated)}")
        clash = sorted(set(self.features + self.labels) & set(RESERVED_OUTPUT_NAMES))
        if clash:
            raise ValueError(f"LogSchema feature/label names {clash} clash with the output columns "
                             f"{list(RESERVED_OUTPUT_NAMES)}; rename them in the file")

    @property
    def output_columns(self) -> tuple[str, ...]:
        """Columns of ``read_interactions``'s result, in order."""
        return (ROW, USER, ITEM, TIME, *self.features, *self.labels)


@dataclass
class DataSpec:
    """What the model needs to know about the data: table sizes (ids 0 and 1 are PAD and OOV)."""

    num_items: int
    """Rows of the item table, reserved ids included."""
    feature_cardinalities: dict[str, int] = field(default_factory=dict)
    """Rows of each side-feature table, by feature name."""

    def __post_init__(self) -> None:
        require(self.num_items > RESERVED_IDS, "data_spec.num_items",
                f"needs at least one real item, got {self.num_items}")


def time_gap_bucket(gaps: Tensor, num_buckets: int) -> Tensor:
    """Seconds since the previous event -> bucket id in ``[1, num_buckets)``; 0 is "no previous event"
    (pass a negative gap for it). Buckets are ``1 + floor(log2(1 + gap))``, clipped."""
    bucket = 1 + torch.floor(torch.log2(1.0 + gaps.clamp(min=0).to(torch.float64))).to(torch.int64)
    return torch.where(gaps < 0, torch.zeros_like(bucket), bucket.clamp(max=num_buckets - 1))
