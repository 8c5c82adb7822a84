"""Read an interaction log of any supported format into one validated polars frame.

Output (one row per event, in file order; ``row`` is 1-based, the line number for line formats and the
data row after the header for csv)::

    row | user_id | item_id | timestamp | <features...> | <labels...>
    i64 | str     | str     | i64       | str (nullable) | i64

Formats (``format="auto"`` picks one from the file name, see ``detect_format``):

=========  ===========================================================================================
parquet    columns named by ``LogSchema``
csv        header row, columns named by ``LogSchema``
jsonl      one JSON object per line, keys named by ``LogSchema`` (``.json`` files are read this way)
ml-100k    MovieLens 100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``, no header
ml-dat     MovieLens 1M/10M ``ratings.dat``: ``user::item::rating::timestamp``
ml-csv     MovieLens 20M/latest ``ratings.csv``: header ``userId,movieId,rating,timestamp``
sasrec     one line per user: ``user item item ...`` in time order; timestamp = 0-based index in line
=========  ===========================================================================================

Every rating counts as an interaction (implicit feedback); MovieLens formats offer ``rating`` as a
feature. Timestamps must be integers (integral floats such as ``12.0`` are accepted); parquet
Datetime/Date columns become microseconds since the Unix epoch. Every problem raises ``DataError``
naming the file, row and column. All work is vectorised polars: no Python loop over rows (except over
rows already found bad).

Row-level problems (a line that is not a JSON object, a nested JSON value, a missing, NaN or out-of-range
value, a MovieLens line with the wrong number of fields) can instead be collected: pass a list as
``bad_rows`` and each bad row is appended to it as a ``BadRow`` and left out of the result. Problems of
the whole file (missing column, unknown format, unreadable file) always raise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import polars as pl

from ksa_rec.data.schema import ITEM, ROW, TIME, USER, LogSchema
from ksa_rec.errors import DataError

Format = Literal["auto", "parquet", "csv", "jsonl", "ml-100k", "ml-dat", "ml-csv", "sasrec"]
FORMATS: tuple[str, ...] = get_args(Format)
_TMP_ROW = "__ksa_rec_row__"  # polars' row index name while reading; a file may have its own "row"
_RAW_LINE = "__ksa_rec_line__"  # a line format's raw text, kept for BadRow.raw
_ML_COLUMNS = (USER, ITEM, "rating", TIME)  # headerless MovieLens files, in field order
_INT64_LIMIT = 2.0**63
MISSING_TEXT = ("", "nan", "NaN", "NAN", "Nan")
"""Id text read as a missing value (a float NaN written as text by a dataframe library)."""


@dataclass(frozen=True)
class BadRow:
    """A row left out of the result: where it is, what is wrong, and its raw text."""

    row: int
    """1-based row number, counted as in ``DataError``."""
    column: str | None
    """The offending column as the file names it (None: the whole row, e.g. not JSON)."""
    problem: str
    """One line saying what is wrong."""
    raw: str
    """The row as read: the line for line formats, else a JSON object of its raw values."""

    def error(self, file: str) -> DataError:
        return DataError(self.problem, file=file, row=self.row, column=self.column)


def detect_format(path: str | Path) -> str:
    """The format ``auto`` resolves to for ``path``: from the file name, and the header for ``.csv``."""
    path = Path(path)
    name, suffix = path.name.lower(), path.suffix.lower()
    if name == "u.data":
        return "ml-100k"
    by_suffix = {".dat": "ml-dat", ".txt": "sasrec", ".parquet": "parquet", ".pq": "parquet",
                 ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix == ".csv":
        try:
            with path.open("rb") as handle:
                header = handle.readline().decode("utf-8", errors="replace")
        except OSError as err:
            raise DataError(f"cannot read: {err.strerror or err}", file=str(path)) from err
        columns = {c.strip().strip('"') for c in header.split(",")}
        return "ml-csv" if {"userId", "movieId"} <= columns else "csv"
    raise DataError(f"cannot tell the format from the file name; pass format= one of "
                    f"{', '.join(FORMATS[1:])}", file=str(path))


def read_interactions(path: str | Path, *, format: Format = "auto",  # noqa: A002 - the public API name
                      schema: LogSchema = LogSchema(), bad_rows: list[BadRow] | None = None) -> pl.DataFrame:
    """Read and validate an interaction log; see the module docstring for formats and output columns.
    ``bad_rows``: collect row-level problems there instead of raising on the first."""
    file = str(path)
    path = Path(path)
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}", file=file)
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a regular file", file=file)
    if path.stat().st_size == 0:
        raise DataError("file is empty", file=file)
    fmt = detect_format(path) if format == "auto" else format
    with _polars_errors(file, fmt):
        frame, source_names = _READERS[fmt](path, schema, file, bad_rows)
    if frame.height == 0 and not bad_rows:
        raise DataError("no data rows", file=file)
    return _validate(frame, schema, source_names, file, bad_rows)


# ----------------------------------------------------------------------------------------- readers
# Each reader returns (frame, source_names): the frame has ROW plus the schema's output columns in raw
# dtypes (line formats also _RAW_LINE); source_names maps output column -> the name the user knows from
# the file, for messages. Row-level problems go to bad_rows when it is a list, else raise.

_Reader = Callable[[Path, LogSchema, str, "list[BadRow] | None"], tuple[pl.DataFrame, dict[str, str]]]


def _read_csv(path: Path, schema: LogSchema, file: str,
              bad_rows: list[BadRow] | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    # infer_schema=False: every column as text, so a bad value is reported by us with its row
    # instead of failing polars' type inference somewhere in the file.
    lazy = pl.scan_csv(path, infer_schema=False, row_index_name=_TMP_ROW, row_index_offset=1)
    present = [c for c in lazy.collect_schema().names() if c != _TMP_ROW]
    try:
        return _select_columns(lazy, present, schema, file)
    except pl.exceptions.ComputeError as err:
        if "more fields" in str(err):
            _raise_ragged_csv_row(path, len(present), file)
        raise


def _read_ml_csv(path: Path, schema: LogSchema, file: str,
                 bad_rows: list[BadRow] | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    return _read_csv(path, replace(schema, user_col="userId", item_col="movieId", time_col="timestamp"),
                     file)


def _read_parquet(path: Path, schema: LogSchema, file: str,
                  bad_rows: list[BadRow] | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    lazy = pl.scan_parquet(path).with_row_index(_TMP_ROW, offset=1)
    present = [c for c in lazy.collect_schema().names() if c != _TMP_ROW]
    return _select_columns(lazy, present, schema, file)


def read_jsonl_lines(lines: list[str], *, schema: LogSchema = LogSchema(), file: str = "<stdin>",
                     first_row: int = 1, bad_rows: list[BadRow] | None = None) -> pl.DataFrame:
    """Parse and validate JSON lines already in memory (e.g. a micro-batch read from stdin); row numbers
    in errors count from ``first_row``. Blank lines are skipped (but counted). Output and ``bad_rows`` as
    ``read_interactions``."""
    frame = pl.DataFrame({"line": lines}, schema={"line": pl.String}).with_row_index(_TMP_ROW, offset=first_row)
    frame = frame.with_columns(pl.col(_TMP_ROW).cast(pl.Int64)).filter(pl.col("line").str.strip_chars() != "")
    with _polars_errors(file, "jsonl"):
        parsed, source_names = _parse_jsonl(frame, schema, file, bad_rows)
    return _validate(parsed, schema, source_names, file, bad_rows)


def _read_jsonl(path: Path, schema: LogSchema, file: str,
                bad_rows: list[BadRow] | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    return _parse_jsonl(_nonblank_lines(path), schema, file, bad_rows)


def _parse_jsonl(lines: pl.DataFrame, schema: LogSchema, file: str,
                 bad_rows: list[BadRow] | None) -> tuple[pl.DataFrame, dict[str, str]]:
    needed = _needed_columns(schema)
    text = pl.col("line")
    # json_path_match("$") is null exactly where a line is not valid JSON: vectorised row finding.
    not_object = text.str.json_path_match("$").is_null() | ~text.str.strip_chars_start().str.starts_with("{")
    lines = _drop_bad_rows(lines, not_object, bad_rows, file, lambda line: (
        None, f"not a JSON object: {_clip(line)} (jsonl needs one object per line)"))
    if lines.height == 0:
        return _no_rows(needed), needed
    # Column presence from the first record; a key missing later is a missing value in that row.
    present = list(json.loads(lines["line"][0]))
    _require(present, needed.values(), file)
    # Decode every needed key as text: mixed JSON types (1 vs "1") then parse the same way as csv. Only a
    # nested value (object or list) fails that; then find its rows (Python, paid only by such files).
    struct = pl.Struct({source: pl.String for source in needed.values()})
    try:
        decoded = lines.select(_TMP_ROW, "line", text.str.json_decode(struct).alias("record"))
    except pl.exceptions.ComputeError:
        nested = pl.Series([_nested_key(line, needed.values()) is not None for line in lines["line"]])
        lines = _drop_bad_rows(lines, nested, bad_rows, file, lambda line: _describe_nested(line, needed.values()))
        decoded = lines.select(_TMP_ROW, "line", text.str.json_decode(struct).alias("record"))
    frame = decoded.unnest("record").select(pl.col(_TMP_ROW).alias(ROW), pl.col("line").alias(_RAW_LINE),
                                            *[pl.col(source).alias(out) for out, source in needed.items()])
    return frame, needed


def _nested_key(line: str, keys: Any) -> str | None:
    """The first of ``keys`` whose value in the JSON object ``line`` is an object or a list."""
    record = json.loads(line)
    return next((k for k in keys if isinstance(record.get(k), (dict, list))), None)


def _describe_nested(line: str, keys: Any) -> tuple[str | None, str]:
    key = _nested_key(line, keys)
    value = json.dumps(json.loads(line)[key])
    return key, f"nested JSON value {_clip(value)}; expected a string or number"


def _read_ml_100k(path: Path, schema: LogSchema, file: str,
                  bad_rows: list[BadRow] | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    return _read_fixed_fields(path, "\t", schema, file, bad_rows)


def _read_ml_dat(path: Path, schema: LogSchema, file: str,
                 bad_rows: list[BadRow] | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    return _read_fixed_fields(path, "::", schema, file, bad_rows)


def _read_fixed_fields(path: Path, separator: str, schema: LogSchema, file: str,
                       bad_rows: list[BadRow] | None) -> tuple[pl.DataFrame, dict[str, str]]:
    """Headerless MovieLens lines ``user<sep>item<sep>rating<sep>timestamp``."""
    _require(list(_ML_COLUMNS), [*schema.features, *schema.labels], file)
    lines = _nonblank_lines(path)
    wrong_count = pl.col("line").str.split(separator).list.len() != len(_ML_COLUMNS)
    lines = _drop_bad_rows(lines, wrong_count, bad_rows, file, lambda line: (
        None, f"expected {len(_ML_COLUMNS)} fields separated by {separator!r} ({', '.join(_ML_COLUMNS)}), "
              f"found {len(line.split(separator))}"))
    parts = lines.select(_TMP_ROW, "line", pl.col("line").str.split(separator).alias("parts"))
    wanted = [USER, ITEM, TIME, *schema.features, *schema.labels]
    frame = parts.select(pl.col(_TMP_ROW).alias(ROW), pl.col("line").alias(_RAW_LINE),
                         *[pl.col("parts").list.get(_ML_COLUMNS.index(c)).alias(c) for c in wanted])
    return frame, {c: c for c in wanted}


def _read_sasrec(path: Path, schema: LogSchema, file: str,
                 bad_rows: list[BadRow] | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    """``user item item ...`` per line -> one event per item, timestamp = index of the item in line."""
    _require([USER, ITEM, TIME], [*schema.features, *schema.labels], file)
    lines = _nonblank_lines(path)
    tokens = pl.col("line").str.replace_all(r"\s+", " ").str.strip_chars().str.split(" ")
    parts = lines.select(_TMP_ROW, tokens.alias("parts"))
    bad = parts.filter(pl.col("parts").list.len() < 2).head(1)
    if bad.height:
        raise DataError(f"user {bad['parts'][0][0]!r} has no items (expected 'user item item ...')",
                        file=file, row=bad[_TMP_ROW][0], column=ITEM)
    users = parts.select(_TMP_ROW, pl.col("parts").list.first().alias(USER),
                         pl.col("parts").list.slice(1).alias(ITEM))
    # Timestamps are positions within one line, so a user split over two lines would interleave.
    repeated = users.filter(~pl.col(USER).is_first_distinct()).head(1)
    if repeated.height:
        user = repeated[USER][0]
        first = users.filter(pl.col(USER) == user)[_TMP_ROW][0]
        raise DataError(f"user {user!r} already has line {first} (sasrec files have one line per user)",
                        file=file, row=repeated[_TMP_ROW][0], column=USER)
    frame = (users.with_columns(pl.int_ranges(0, pl.col(ITEM).list.len(), dtype=pl.Int64).alias(TIME))
             .explode([ITEM, TIME])
             .select(pl.col(_TMP_ROW).alias(ROW), USER, ITEM, TIME))
    return frame, {USER: USER, ITEM: ITEM, TIME: TIME}


_READERS: dict[str, _Reader] = {
    "parquet": _read_parquet, "csv": _read_csv, "jsonl": _read_jsonl, "ml-100k": _read_ml_100k,
    "ml-dat": _read_ml_dat, "ml-csv": _read_ml_csv, "sasrec": _read_sasrec,
}


def _nonblank_lines(path: Path) -> pl.DataFrame:
    """``[_TMP_ROW (line number), line]`` of the non-blank lines (a trailing newline is not a row)."""
    lazy = pl.scan_lines(path, name="line", row_index_name=_TMP_ROW, row_index_offset=1)
    return lazy.filter(pl.col("line").str.strip_chars() != "").collect()


def _drop_bad_rows(lines: pl.DataFrame, bad: pl.Expr | pl.Series, bad_rows: list[BadRow] | None, file: str,
                   describe: Callable[[str], tuple[str | None, str]]) -> pl.DataFrame:
    """``lines`` without the rows where ``bad`` holds: with ``bad_rows`` None the first of them raises,
    else each is appended there (``describe(line)`` gives its column and problem)."""
    flagged = lines.filter(bad)
    if flagged.height == 0:
        return lines
    if bad_rows is None:
        row, line = flagged[_TMP_ROW][0], flagged["line"][0]
        raise BadRow(row, *describe(line), raw=line).error(file)
    bad_rows.extend(BadRow(row, *describe(line), raw=line) for row, line in zip(flagged[_TMP_ROW], flagged["line"]))
    return lines.filter(~bad)


def _no_rows(needed: dict[str, str]) -> pl.DataFrame:
    """An empty reader result (every line of a line format was bad)."""
    return pl.DataFrame(schema={ROW: pl.Int64, _RAW_LINE: pl.String, **{out: pl.String for out in needed}})


def _needed_columns(schema: LogSchema) -> dict[str, str]:
    """Output column -> file column."""
    return {USER: schema.user_col, ITEM: schema.item_col, TIME: schema.time_col,
            **{c: c for c in schema.features}, **{c: c for c in schema.labels}}


def _require(present: list[str], needed: Any, file: str) -> None:
    for column in needed:
        if column not in present:
            raise DataError(f"missing required column; columns present: {', '.join(present) or '(none)'}",
                            file=file, column=column)


def _select_columns(lazy: pl.LazyFrame, present: list[str], schema: LogSchema,
                    file: str) -> tuple[pl.DataFrame, dict[str, str]]:
    needed = _needed_columns(schema)
    _require(present, needed.values(), file)
    frame = lazy.select(pl.col(_TMP_ROW).alias(ROW),
                        *[pl.col(source).alias(out) for out, source in needed.items()]).collect()
    return frame, needed


def _raise_ragged_csv_row(path: Path, num_columns: int, file: str) -> None:
    """Name the first data row with more fields than the header (unquoted lines only: a quoted comma
    is not a separator, and polars has already said the file is ragged)."""
    lines = _nonblank_lines(path).slice(1)  # skip the header
    fields = pl.col("line").str.count_matches(",", literal=True) + 1
    bad = lines.filter((fields > num_columns) & ~pl.col("line").str.contains('"', literal=True)).head(1)
    if bad.height:
        raise DataError(f"{bad.select(fields).item()} fields but the header has {num_columns}",
                        file=file, row=bad[_TMP_ROW][0] - 1)


@contextmanager
def _polars_errors(file: str, fmt: str) -> Iterator[None]:
    """Turn polars/OS read failures into one-line ``DataError``s naming the file."""
    try:
        yield
    except pl.exceptions.PolarsError as err:
        raise DataError(f"cannot read as {fmt}: {_first_line(err)}", file=file) from err
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror or err}", file=file) from err


# -------------------------------------------------------------------------------------- validation

def _validate(frame: pl.DataFrame, schema: LogSchema, source_names: dict[str, str], file: str,
              bad_rows: list[BadRow] | None = None) -> pl.DataFrame:
    """Parse raw columns into the output dtypes; a required value that cannot be parsed becomes null,
    and the first null (found vectorised) is reported with its raw value (or, with ``bad_rows``, every
    row holding one is moved there)."""
    integers = (TIME, *schema.labels)
    parsers = {USER: _id_expr, ITEM: _id_expr, **{c: _int_expr for c in integers}}
    exprs = {name: parse(name, frame.schema[name], source_names[name], file)
             for name, parse in parsers.items()}
    exprs.update({name: _feature_expr(name, frame.schema[name], file) for name in schema.features})
    out = frame.select(pl.col(ROW).cast(pl.Int64), *[exprs[c].alias(c) for c in schema.output_columns[1:]])
    for name in integers:
        # Second chance for text such as "12.0" or "1e9", paid only by files that need it.
        if frame.schema[name] == pl.String and out[name].null_count():
            as_float = frame.select(pl.col(name).str.strip_chars().cast(pl.Float64, strict=False))
            fallback = as_float.select(_integral_float(pl.col(name))).to_series()
            out = out.with_columns(out[name].fill_null(fallback))
    failed = [name for name in parsers if out[name].null_count()]
    if not failed:
        return out
    is_bad = out.select(pl.any_horizontal(*[pl.col(c).is_null() for c in failed])).to_series()
    positions = [is_bad.arg_max()] if bad_rows is None else is_bad.arg_true().to_list()
    found = []
    for position in positions:
        name = next(c for c in failed if out[c][position] is None)
        describe = _describe_int if name in integers else _describe_id
        found.append(BadRow(out[ROW][position], source_names[name], describe(frame[name][position]),
                            _raw_text(frame, source_names, position)))
    if bad_rows is None:
        raise found[0].error(file)
    bad_rows.extend(found)
    return out.filter(~is_bad)


def _raw_text(frame: pl.DataFrame, source_names: dict[str, str], position: int) -> str:
    """Row ``position`` as read: its line, or a JSON object of its raw values under the file's names."""
    if _RAW_LINE in frame.columns:
        return frame[_RAW_LINE][position]
    return json.dumps({source: frame[out][position] for out, source in source_names.items()}, default=str)


def _id_expr(name: str, dtype: pl.DataType, source: str, file: str) -> pl.Expr:
    """User/item id as stripped text; null where missing, empty or NaN."""
    col = pl.col(name)
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        col, dtype = col.cast(pl.String), pl.String()
    if dtype == pl.String:
        text = col.str.strip_chars()
        # "nan"/"NaN" is what a float NaN becomes when a dataframe library writes text.
        return pl.when(text.is_in(MISSING_TEXT)).then(None).otherwise(text)
    if dtype.is_integer():
        return col.cast(pl.String)
    if dtype.is_float():
        # Ids stored as floats (a column with NaNs in pandas) read back as "7", not "7.0".
        as_int = _integral_float(col).cast(pl.String)
        return pl.when(col.is_finite()).then(pl.coalesce(as_int, col.cast(pl.String)))
    raise DataError(f"unsupported column type {dtype} for an id", file=file, column=source)


def _int_expr(name: str, dtype: pl.DataType, source: str, file: str) -> pl.Expr:
    """Timestamp/label as Int64; null where missing or not a whole number in int64 range."""
    col = pl.col(name)
    if dtype.is_integer():
        return col.cast(pl.Int64, strict=False)  # null also where a UInt64 does not fit
    if dtype.is_float():
        return _integral_float(col)
    if dtype == pl.String:
        return col.str.strip_chars().cast(pl.Int64, strict=False)  # _validate retries as float
    if name == TIME and isinstance(dtype, (pl.Datetime, pl.Date)):
        return col.dt.epoch("us")
    raise DataError(f"unsupported column type {dtype} for an integer column", file=file, column=source)


def _integral_float(col: pl.Expr) -> pl.Expr:
    """Int64 where ``col`` is a finite whole number within int64 range, else null."""
    ok = col.is_finite() & (col == col.floor()) & (col.abs() < _INT64_LIMIT)
    return pl.when(ok).then(col.cast(pl.Int64, strict=False))


def _feature_expr(name: str, dtype: pl.DataType, file: str) -> pl.Expr:
    """Feature as text; null/empty/NaN stay null (encoded as OOV later: an unknown category)."""
    col = pl.col(name)
    if dtype.is_float():
        return pl.when(col.is_nan()).then(None).otherwise(col.cast(pl.String))
    if dtype.is_integer() or dtype in (pl.String, pl.Boolean) or isinstance(dtype, (pl.Categorical, pl.Enum)):
        text = col.cast(pl.String).str.strip_chars()
        return pl.when(text == "").then(None).otherwise(text)
    raise DataError(f"unsupported column type {dtype} for a categorical feature", file=file, column=name)


def _describe_id(raw: Any) -> str:
    if raw is None:
        return "missing value"
    if isinstance(raw, float):
        return f"not a finite number: {raw!r}"
    if str(raw).strip() == "":
        return "empty value"
    return f"{_clip(raw)} is not a valid id (NaN)"


def _describe_int(raw: Any) -> str:
    if raw is None:
        return "missing value"
    text = str(raw).strip()
    if text == "":
        return "empty value"
    try:
        number = float(text)
    except ValueError:
        return f"not a number: {_clip(raw)}"
    if not math.isfinite(number):
        return f"not a finite number: {_clip(raw)}"
    if number != math.floor(number):
        return f"not an integer: {_clip(raw)}"
    return f"not a valid int64: {_clip(raw)}"


def _clip(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
