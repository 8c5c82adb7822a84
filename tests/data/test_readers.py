"""read_interactions: every format, good and malformed, with the exact one-line error texts."""

from __future__ import annotations

import datetime
from pathlib import Path

import polars as pl
import pytest

from ksa_rec.data.readers import FORMATS, detect_format, read_interactions
from ksa_rec.data.schema import LogSchema
from ksa_rec.errors import DataError

BASE_SCHEMA = {"row": pl.Int64, "user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def read_error(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_interactions(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ csv

def test_csv_reads_columns_features_and_labels(tmp_path):
    path = write(tmp_path, "log.csv",
                 "uid,timestamp,item,category,dist,extra\n"
                 "u1,10,a,x,3,?\n"
                 " u2 ,12.0,b,,-1,?\n"   # padded id is stripped; 12.0 is a whole number; empty feature
                 "u1,1e3,c,y,0,?\n")
    schema = LogSchema(user_col="uid", item_col="item", features=("category",), labels=("dist",))
    frame = read_interactions(path, schema=schema)
    assert frame.schema == pl.Schema({**BASE_SCHEMA, "category": pl.String, "dist": pl.Int64})
    assert frame.rows() == [(1, "u1", "a", 10, "x", 3), (2, "u2", "b", 12, None, -1),
                            (3, "u1", "c", 1000, "y", 0)]


@pytest.mark.parametrize("body, expected", [
    ("user_id,item_id,timestamp\n1,a,5\n1,b,6\n1,c,x\n", "row 3, column 'timestamp': not a number: 'x'"),
    ("user_id,item_id,timestamp\n1,a,5\n1,b,12.5\n", "row 2, column 'timestamp': not an integer: '12.5'"),
    ("user_id,item_id,timestamp\n1,a,nan\n", "row 1, column 'timestamp': not a finite number: 'nan'"),
    ("user_id,item_id,timestamp\n1,a,5\n1,b,inf\n", "row 2, column 'timestamp': not a finite number: 'inf'"),
    ("user_id,item_id,timestamp\n1,a,5\n1,b,\n", "row 2, column 'timestamp': missing value"),
    ("user_id,item_id,timestamp\n1,a,1e30\n", "row 1, column 'timestamp': not a valid int64: '1e30'"),
    ("user_id,item_id,timestamp\n1,a,5\n,b,6\n", "row 2, column 'user_id': missing value"),
    ("user_id,item_id,timestamp\n1,a,5\n2,NaN,6\n", "row 2, column 'item_id': 'NaN' is not a valid id (NaN)"),
    ("user_id,item_id,timestamp\n1,a,5\n2,\" \",6\n", "row 2, column 'item_id': empty value"),
    # The first bad row wins, whatever the column.
    ("user_id,item_id,timestamp\n1,a,5\n1,b,x\n,c,6\n", "row 2, column 'timestamp': not a number: 'x'"),
    ("user_id,item_id\n1,a\n", "column 'timestamp': missing required column; columns present: user_id, item_id"),
    ("user_id,item_id,timestamp\n1,a,5\n1,b,6,7\n", "row 2: 4 fields but the header has 3"),
    ("user_id,item_id,timestamp\n", "no data rows"),
])
def test_csv_errors_name_file_row_and_column(tmp_path, body, expected):
    path = write(tmp_path, "bad.csv", body)
    assert read_error(path) == f"{path}: {expected}"


def test_empty_missing_and_unknown_files(tmp_path):
    empty = write(tmp_path, "empty.csv", "")
    assert read_error(empty) == f"{empty}: file is empty"
    missing = tmp_path / "nope.csv"
    assert read_error(missing) == f"{missing}: file not found"
    odd = write(tmp_path, "log.xlsx", "x")
    assert read_error(odd) == (f"{odd}: cannot tell the format from the file name; pass format= one of "
                               "parquet, csv, jsonl, ml-100k, ml-dat, ml-csv, sasrec")
    good = write(tmp_path, "log.csv", "user_id,item_id,timestamp\n1,a,5\n")
    assert read_error(good, format="xml").startswith(f"{good}: unknown format 'xml'; expected one of auto,")


def test_undecodable_file_is_a_data_error(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(b"user_id,item_id,timestamp\n1,\xff\xfe,5\n")
    assert read_error(path).startswith(f"{path}: cannot read as csv: ")


# --------------------------------------------------------------------------------------- MovieLens

def test_ml_100k_u_data(tmp_path):
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n\n")
    frame = read_interactions(path, schema=LogSchema(features=("rating",)))
    assert frame.rows() == [(1, "196", "242", 881250949, "3"), (2, "186", "302", 891717742, "3")]


@pytest.mark.parametrize("body, expected", [
    ("1\t2\t3\t4\n1\t2\t3\n",
     "row 2: expected 4 fields separated by '\\t' (user_id, item_id, rating, timestamp), found 3"),
    ("1\t2\t3\t4\n\n1\t2\t3\tlate\n", "row 3, column 'timestamp': not a number: 'late'"),
])
def test_ml_100k_errors(tmp_path, body, expected):
    path = write(tmp_path, "u.data", body)
    assert read_error(path) == f"{path}: {expected}"


def test_ml_dat_ratings(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::1193::5::978300760\r\n1::661::3::978302109\r\n")
    frame = read_interactions(path)
    assert frame.schema == pl.Schema(BASE_SCHEMA)
    assert frame.rows() == [(1, "1", "1193", 978300760), (2, "1", "661", 978302109)]


@pytest.mark.parametrize("body, expected", [
    ("1::2::3::4\n1::2::3::4::5\n",
     "row 2: expected 4 fields separated by '::' (user_id, item_id, rating, timestamp), found 5"),
    ("1::2::3::4\n1:2:3:4\n",
     "row 2: expected 4 fields separated by '::' (user_id, item_id, rating, timestamp), found 1"),
    ("1::2::3::4\n::2::3::4\n", "row 2, column 'user_id': empty value"),
])
def test_ml_dat_errors(tmp_path, body, expected):
    path = write(tmp_path, "ratings.dat", body)
    assert read_error(path) == f"{path}: {expected}"


def test_ml_dat_refuses_unknown_feature(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::2::3::4\n")
    assert read_error(path, schema=LogSchema(features=("genre",))) == (
        f"{path}: column 'genre': missing required column; columns present: user_id, item_id, rating, timestamp")


def test_ml_csv_ratings(tmp_path):
    path = write(tmp_path, "ratings.csv",
                 "userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,3,4.5,964981247\r\n")
    assert detect_format(path) == "ml-csv"
    frame = read_interactions(path, schema=LogSchema(features=("rating",)))
    assert frame.rows() == [(1, "1", "1", 964982703, "4.0"), (2, "1", "3", 964981247, "4.5")]


def test_ml_csv_errors_use_the_file_column_names(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,,4.0,1\n")
    assert read_error(path) == f"{path}: row 2, column 'movieId': missing value"
    path = write(tmp_path, "other.csv", "userId,rating,timestamp\n1,4.0,964982703\n")
    assert read_error(path, format="ml-csv") == (
        f"{path}: column 'movieId': missing required column; columns present: userId, rating, timestamp")


# ------------------------------------------------------------------------------------------- sasrec

def test_sasrec_lines_become_events_with_position_timestamps(tmp_path):
    path = write(tmp_path, "Beauty.txt", "1 1 2 3\n\n2  4\t5 \n3 2\n")
    frame = read_interactions(path)
    assert frame.rows() == [(1, "1", "1", 0), (1, "1", "2", 1), (1, "1", "3", 2),
                            (3, "2", "4", 0), (3, "2", "5", 1), (4, "3", "2", 0)]


@pytest.mark.parametrize("body, expected", [
    ("1 1 2\n2\n", "row 2, column 'item_id': user '2' has no items (expected 'user item item ...')"),
    ("1 1 2\n2 3\n1 4\n", "row 3, column 'user_id': user '1' already has line 1 (sasrec files have one line per user)"),
])
def test_sasrec_errors(tmp_path, body, expected):
    path = write(tmp_path, "seq.txt", body)
    assert read_error(path) == f"{path}: {expected}"


# -------------------------------------------------------------------------------------------- jsonl

def test_jsonl_mixed_types_and_blank_lines(tmp_path):
    path = write(tmp_path, "log.jsonl",
                 '{"user_id": 1, "item_id": "a", "timestamp": 3, "action": "click"}\n'
                 "\n"
                 '{"user_id": "u2", "item_id": 5, "timestamp": 4.0, "action": null}\n')
    frame = read_interactions(path, schema=LogSchema(features=("action",)))
    assert frame.rows() == [(1, "1", "a", 3, "click"), (3, "u2", "5", 4, None)]


@pytest.mark.parametrize("body, expected", [
    ('{"user_id": 1, "item_id": 2, "timestamp": 3}\n\n{"user_id": 1, "item_id": 2\n',
     "row 3: not a JSON object: '{\"user_id\": 1, \"item_id\": 2' (jsonl needs one object per line)"),
    ('{"user_id": 1, "item_id": 2, "timestamp": 3}\n[1, 2, 3]\n',
     "row 2: not a JSON object: '[1, 2, 3]' (jsonl needs one object per line)"),
    ('{"user_id": 1, "item_id": 2, "timestamp": 3}\n{"user_id": 1, "item_id": 2}\n',
     "row 2, column 'timestamp': missing value"),
    ('{"user_id": 1, "item": 2, "timestamp": 3}\n',
     "column 'item_id': missing required column; columns present: user_id, item, timestamp"),
])
def test_jsonl_errors(tmp_path, body, expected):
    path = write(tmp_path, "bad.jsonl", body)
    assert read_error(path) == f"{path}: {expected}"


# ------------------------------------------------------------------------------------------ parquet

def test_parquet_native_types(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({
        "user_id": [7, 8], "item_id": [1.0, 2.0],  # float ids (pandas + NaN habit) read back as "1", not "1.0"
        "timestamp": [datetime.datetime(1970, 1, 1, 0, 0, 1), datetime.datetime(1970, 1, 1, 0, 0, 2)],
        "shop": pl.Series(["s", "t"], dtype=pl.Categorical), "dist": pl.Series([5, 6], dtype=pl.UInt16),
    }).write_parquet(path)
    frame = read_interactions(path, schema=LogSchema(features=("shop",), labels=("dist",)))
    assert frame.rows() == [(1, "7", "1", 1_000_000, "s", 5), (2, "8", "2", 2_000_000, "t", 6)]


@pytest.mark.parametrize("columns, expected", [
    ({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1.0, float("nan")]},
     "row 2, column 'timestamp': not a finite number: nan"),
    ({"user_id": [1.0, float("nan")], "item_id": [1, 2], "timestamp": [1, 2]},
     "row 2, column 'user_id': not a finite number: nan"),
    ({"user_id": [1, 2], "item_id": [1, None], "timestamp": [1, 2]}, "row 2, column 'item_id': missing value"),
    ({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [True, False]},
     "column 'timestamp': unsupported column type Boolean for an integer column"),
    ({"user_id": [1, 2], "timestamp": [1, 2]},
     "column 'item_id': missing required column; columns present: user_id, timestamp"),
])
def test_parquet_errors(tmp_path, columns, expected):
    path = tmp_path / "bad.parquet"
    pl.DataFrame(columns).write_parquet(path)
    assert read_error(path) == f"{path}: {expected}"


def test_not_really_parquet(tmp_path):
    path = write(tmp_path, "fake.parquet", "user_id,item_id,timestamp\n")
    assert read_error(path).startswith(f"{path}: cannot read as parquet: ")


# ------------------------------------------------------------------------------------- format choice

@pytest.mark.parametrize("name, header, expected", [
    ("u.data", "", "ml-100k"), ("ratings.dat", "", "ml-dat"), ("Beauty.txt", "", "sasrec"),
    ("x.parquet", "", "parquet"), ("x.jsonl", "", "jsonl"), ("reviews_Beauty_5.json", "", "jsonl"),
    ("ratings.csv", "userId,movieId,rating,timestamp", "ml-csv"), ("log.csv", "user_id,item_id,timestamp", "csv"),
])
def test_detect_format(tmp_path, name, header, expected):
    assert detect_format(write(tmp_path, name, header + "\n")) == expected
    assert expected in FORMATS


def test_log_schema_validation():
    with pytest.raises(ValueError, match="list of column names"):
        LogSchema(features="category")
    with pytest.raises(ValueError, match="more than once: item_id"):
        LogSchema(features=("item_id",))
    with pytest.raises(ValueError, match="clash with the output columns"):
        LogSchema(user_col="uid", features=("user_id",))
    assert LogSchema(features=["a", "b"]).features == ("a", "b")  # YAML lists become tuples


# ---------------------------------------------------------------------------------- collected bad rows

def test_nested_json_value_names_row_and_column(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"user_id": 1, "item_id": 2, "timestamp": 3}\n'
                                        '{"user_id": 1, "item_id": {"id": 2}, "timestamp": 4}\n')
    assert read_error(path) == f"{path}: row 2, column 'item_id': nested JSON value '{{\"id\": 2}}'; " \
                               "expected a string or number"


def test_bad_rows_are_collected_and_left_out(tmp_path):
    lines = ['{"user_id": 1, "item_id": "a", "timestamp": 3}', "{oops", "",
             '{"user_id": 1, "item_id": [1], "timestamp": 4}', '{"user_id": 1, "item_id": "b", "timestamp": 1e99}',
             '{"user_id": 1, "item_id": "c"}', '{"user_id": 1, "item_id": "d", "timestamp": 9}']
    path = write(tmp_path, "log.jsonl", "\n".join(lines) + "\n")
    bad = []
    frame = read_interactions(path, bad_rows=bad)
    assert frame.rows() == [(1, "1", "a", 3), (7, "1", "d", 9)]
    assert sorted((b.row, b.column, b.raw) for b in bad) == [
        (2, None, "{oops"), (4, "item_id", lines[3]), (5, "timestamp", lines[4]), (6, "timestamp", lines[5])]
    problems = {b.row: b.problem for b in bad}
    assert problems[5].startswith("not a valid int64: ") and problems[6] == "missing value"


def test_collected_rows_of_a_table_keep_their_raw_values(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [1.0, float("nan")], "timestamp": [1, 2]}).write_parquet(path)
    bad = []
    assert read_interactions(path, bad_rows=bad).rows() == [(1, "1", "1", 1)]
    assert [(b.row, b.column, b.problem) for b in bad] == [(2, "item_id", "not a finite number: nan")]
    assert bad[0].raw == '{"user_id": 2, "item_id": NaN, "timestamp": 2}'


def test_a_file_of_only_bad_rows_reads_as_empty_when_collecting(tmp_path):
    path = write(tmp_path, "log.jsonl", "not json\n")
    bad = []
    assert read_interactions(path, bad_rows=bad).height == 0 and [b.row for b in bad] == [1]
    assert read_error(path) == f"{path}: row 1: not a JSON object: 'not json' (jsonl needs one object per line)"
