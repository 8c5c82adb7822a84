"""What every typed config of the package shares: one-line validation errors and loading from dicts."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def require(ok: bool, name: str, problem: str) -> None:
    """Raise ``ValueError("<name>: <problem>")`` unless ``ok`` (the config field's full name, e.g. ``encoder.dim``)."""
    if not ok:
        raise ValueError(f"{name}: {problem}")


def coerce(cls: type[T], value: Any) -> T:
    """Accept a dataclass instance or its ``asdict`` form (how configs come back from checkpoints)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


def check_int(op: str, name: str, value, *, minimum: int, allow_none: bool = False) -> None:
    """``value`` must be a Python/NumPy integer (not a bool) ``>= minimum``, or ``None`` if allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        expected = "an int or None" if allow_none else "an int"
        raise ValueError(f"{op}: {name} must be {expected}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
