"""Exceptions with one-line messages that name where the problem is (file, row, column)."""

from __future__ import annotations


class KsaRecError(Exception):
    """Base class of every error ksa_rec raises on purpose."""


class DataError(KsaRecError, ValueError):
    """Bad input data. ``str(err)`` is one line: ``<file>: row <r>, column '<c>': <problem>``.

    ``row`` is 1-based and counts data rows as the user sees them in the file (for csv with a header,
    row 1 is the first line after the header).
    """

    def __init__(self, problem: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        self.problem = problem
        self.file = file
        self.row = row
        self.column = column
        where = []
        if file is not None:
            where.append(str(file))
        loc = []
        if row is not None:
            loc.append(f"row {row}")
        if column is not None:
            loc.append(f"column '{column}'")
        prefix = ": ".join(filter(None, [", ".join(where), ", ".join(loc)]))
        super().__init__(f"{prefix}: {problem}" if prefix else problem)


class StateError(KsaRecError, ValueError):
    """A user state or state store that cannot be used (corrupt, wrong model, wrong version)."""


class CheckpointError(KsaRecError, ValueError):
    """A checkpoint that cannot be used (corrupt, missing keys, incompatible version)."""


class BackendError(KsaRecError, ValueError):
    """An attention backend that was asked for explicitly but cannot run here (device, dtype, import)."""


class ConfigError(KsaRecError, ValueError):
    """A configuration value or command-line option that cannot be used (unknown key, wrong type, out of
    range, missing file). ``ksa-rec`` exits with status 2 on it, like a usage error."""
