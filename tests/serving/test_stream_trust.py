"""Issue 14, the streaming and scoring data path: a new file under an old name, a restarted pipe, two
writers on one store, existing outputs, typos, late/duplicate/malformed events, unknown ids. Each test
names the finding it covers."""

import io
import json
import os
import subprocess
import sys
import time

import polars as pl
import pytest
from stream_checks import (
    assert_same_outputs,
    assert_same_store,
    event_counts,
    store_dump,
    stream,
)

from ksa_rec.cli import main as ksa_rec


def _lines(frame: pl.DataFrame) -> list[str]:
    return [json.dumps(row) for row in frame.iter_rows(named=True)]


def _write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _summary(path) -> dict:
    return json.loads(path.read_text())


def _counts(capsys) -> dict[str, int]:
    """The counts line the last ``stream`` printed."""
    line = next(x for x in reversed(capsys.readouterr().out.splitlines()) if x.startswith("ksa-rec stream: applied"))
    return {name: int(value) for name, value in (pair.split() for pair in line.split(": ", 1)[1].split(", "))}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line"
    return err[-1]


# ---- 1. progress that cannot skip new data ------------------------------------------------------------------
def test_new_content_under_an_old_file_name_is_applied(trained, event_files, tmp_path, capsys):
    """Finding 1a: the next day's new_events.jsonl, same name, new content: every event applied."""
    checkpoint, _ = trained
    _, frame = event_files
    lines, half = _lines(frame), frame.height // 2
    reference = _write(tmp_path / "all.jsonl", lines)
    assert stream(checkpoint, reference, tmp_path / "ref.db", "--chunk-rows", "50") == 0
    daily = tmp_path / "new_events.jsonl"
    _write(daily, lines[:half])
    assert stream(checkpoint, daily, tmp_path / "s.db", "--chunk-rows", "50") == 0
    _write(daily, lines[half:])
    assert stream(checkpoint, daily, tmp_path / "s.db", "--chunk-rows", "50") == 0
    assert sum(event_counts(checkpoint, tmp_path / "s.db").values()) == frame.height
    assert_same_store(checkpoint, tmp_path / "s.db", tmp_path / "ref.db", tol=1e-4)
    day2 = _counts(capsys)
    assert (day2["applied"], day2["replayed"], day2["late"]) == (frame.height - half, 0, 0)


def test_restarted_pipe_that_replays_its_last_lines_loses_and_repeats_nothing(trained, event_files, tmp_path,
                                                                               monkeypatch, capsys):
    """Finding 1b: `tail -f log | ksa-rec stream --events -` restarted; tail replays its last 10 lines."""
    checkpoint, _ = trained
    _, frame = event_files
    lines, cut = _lines(frame), 300
    assert stream(checkpoint, _write(tmp_path / "all.jsonl", lines), tmp_path / "ref.db", "--chunk-rows", "64") == 0
    for part in (lines[:cut], lines[cut - 10:]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in part)))
        assert stream(checkpoint, "-", tmp_path / "s.db", "--chunk-rows", "64") == 0
    assert sum(event_counts(checkpoint, tmp_path / "s.db").values()) == frame.height
    assert_same_store(checkpoint, tmp_path / "s.db", tmp_path / "ref.db", tol=1e-4)
    restart = _counts(capsys)
    assert (restart["applied"], restart["replayed"], restart["duplicate"]) == (frame.height - cut, 10, 0)


def test_duplicates_in_one_input_are_applied_once(trained, tmp_path):
    """A copy of an event in the same input is a replay of the first copy, not an error."""
    checkpoint, _ = trained
    row = '{"user_id": "u1", "item_id": "i000001", "timestamp": 50, "category": "c"}'
    other = '{"user_id": "u1", "item_id": "i000002", "timestamp": 60, "category": "c"}'
    path = _write(tmp_path / "e.jsonl", [row, row, other, row])
    assert stream(checkpoint, path, tmp_path / "s.db", "--chunk-rows", "2", "--summary", str(tmp_path / "s.json")) == 0
    assert event_counts(checkpoint, tmp_path / "s.db") == {"u1": 2}
    assert (_summary(tmp_path / "s.json")["duplicate"], _summary(tmp_path / "s.json")["applied"]) == (2, 2)


# ---- 2. one writer per store --------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_stream_on_the_same_store_is_refused(trained, event_files, tmp_path):
    """Finding 2: two real `stream` processes on one store. The first holds the store while it waits on
    its pipe; the second is refused naming it; the first's result equals a single run."""
    checkpoint, _ = trained
    events, frame = event_files
    lines = _lines(frame)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def command(source, state):
        return [sys.executable, "-m", "ksa_rec.cli", "stream", "--checkpoint", str(checkpoint), "--events", source,
                "--state", str(state), "--chunk-rows", "16", "--accelerator", "cpu"]

    assert stream(checkpoint, events, tmp_path / "ref.db", "--chunk-rows", "16") == 0
    first = subprocess.Popen(command("-", tmp_path / "s.db"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        first.stdin.write("".join(line + "\n" for line in lines[:200]))
        first.stdin.flush()
        lock = tmp_path / "s.db.lock"
        deadline = time.monotonic() + 300
        while not (lock.exists() and f"pid {first.pid}," in lock.read_text()):
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first stream never took the store's lock"
            time.sleep(0.2)
        second = subprocess.run(command(str(events), tmp_path / "s.db"), capture_output=True, text=True, env=env,
                                timeout=300)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1] == (
            f"ksa-rec stream: error: {tmp_path / 's.db'}: another ksa-rec stream or serve is writing to this store "
            f"({lock.read_text().strip()}); one writer per store")
        first.stdin.write("".join(line + "\n" for line in lines[200:]))
        first.stdin.close()
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
    assert_same_store(checkpoint, tmp_path / "s.db", tmp_path / "ref.db")
    assert_same_outputs(tmp_path / "s.db.outputs.jsonl", tmp_path / "ref.db.outputs.jsonl")


# ---- 3. outputs are never destroyed -------------------------------------------------------------------------
def test_an_existing_jsonl_output_is_kept(trained, event_files, tmp_path, capsys):
    """Finding 3a: an output the store did not write is refused, and not even a failing --overwrite run
    touches it; a good --overwrite run replaces it."""
    checkpoint, _ = trained
    events, _ = event_files
    output = tmp_path / "recs.jsonl"
    output.write_text("precious\n")
    assert stream(checkpoint, events, tmp_path / "s.db", "--output", str(output)) == 1
    assert _error_line(capsys) == (f"ksa-rec stream: error: {output}: exists and this state store has no record "
                                   "of writing it; pass --overwrite to replace it, or choose another --output")
    late = _write(tmp_path / "late.jsonl", ['{"user_id": "u1", "item_id": "a", "timestamp": 9, "category": "c"}',
                                            '{"user_id": "u1", "item_id": "b", "timestamp": 5, "category": "c"}'])
    assert stream(checkpoint, late, tmp_path / "s.db", "--output", str(output), "--overwrite") == 1
    assert "is before the user's previous event" in _error_line(capsys)
    assert output.read_text() == "precious\n"
    assert stream(checkpoint, events, tmp_path / "s.db", "--output", str(output), "--overwrite") == 0
    assert "precious" not in output.read_text() and len(output.read_text().splitlines()) > 1


def test_an_output_changed_outside_is_refused(trained, event_files, tmp_path, capsys):
    checkpoint, _ = trained
    events, frame = event_files
    lines = _lines(frame)
    output = tmp_path / "recs.jsonl"
    first = _write(tmp_path / "a.jsonl", lines[:100])
    assert stream(checkpoint, first, tmp_path / "s.db", "--output", str(output)) == 0
    output.write_text(output.read_text()[:10])
    assert stream(checkpoint, events, tmp_path / "s.db", "--output", str(output)) == 1
    assert "so it was changed outside ksa-rec stream; pass --overwrite" in _error_line(capsys)
    assert len(output.read_text()) == 10


def _foreign_parquet_dir(path):
    path.mkdir()
    (path / "_SUCCESS").write_text("")
    pl.DataFrame({"x": [1, 2]}).write_parquet(path / "part-00000-3f1c2a.snappy.parquet")
    pl.DataFrame({"x": [3]}).write_parquet(path / "part-00000001.parquet")  # the old pattern is foreign now
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_an_existing_parquet_directory_is_refused_and_kept(trained, event_files, tmp_path, capsys):
    """Findings 3b and 3c: a directory with files of its own (Spark-style) loses nothing and crashes nothing."""
    checkpoint, _ = trained
    events, _ = event_files
    output = tmp_path / "recs.parquet"
    foreign = _foreign_parquet_dir(output)
    assert stream(checkpoint, events, tmp_path / "s.db", "--output", str(output)) == 1
    assert f"{output}: exists and this state store has no record of writing it" in _error_line(capsys)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == foreign


def test_parquet_parts_next_to_foreign_files(trained, event_files, tmp_path):
    """--overwrite into a Spark-style directory: our parts are added, foreign files stay; a restart removes
    only our own uncommitted parts and temporary files."""
    checkpoint, _ = trained
    events, frame = event_files
    output = tmp_path / "recs.parquet"
    foreign = _foreign_parquet_dir(output)
    first = _write(tmp_path / "first.jsonl", _lines(frame)[:200])
    assert stream(checkpoint, first, tmp_path / "s.db", "--output", str(output), "--overwrite",
                  "--chunk-rows", "50") == 0
    ours = sorted(p.name for p in output.glob("ksa-rec-part-*.parquet"))
    assert ours == [f"ksa-rec-part-{i:08d}.parquet" for i in range(4)]
    # what a run killed after its output write leaves behind: a part beyond the committed count and a .tmp
    (output / "ksa-rec-part-00000004.parquet").write_bytes(b"uncommitted")
    (output / "ksa-rec-part-00000005.parquet.tmp").write_bytes(b"half")
    assert stream(checkpoint, events, tmp_path / "s.db", "--output", str(output), "--chunk-rows", "50") == 0
    assert {p.name: p.read_bytes() for p in output.iterdir() if p.name in foreign} == foreign
    assert not list(output.glob("*.tmp"))
    parts = pl.read_parquet(output / "ksa-rec-part-*.parquet")
    assert parts["row"].max() == frame.height and parts.filter(pl.col("row") <= 200).height > 0


def test_score_keeps_an_existing_output_and_leaves_no_temporary_file(trained, event_files, tmp_path, capsys):
    checkpoint, _ = trained
    events, _ = event_files
    assert stream(checkpoint, events, tmp_path / "s.db", "--chunk-rows", "64") == 0
    output = tmp_path / "scores.parquet"
    output.write_bytes(b"precious")
    args = ["score", "--checkpoint", str(checkpoint), "--state", str(tmp_path / "s.db"), "--output", str(output),
            "--accelerator", "cpu", "--batch-size", "1"]
    assert ksa_rec(args) == 1
    assert _error_line(capsys) == (f"ksa-rec score: error: {output}: exists; pass --overwrite to replace it, "
                                   "or choose another --output")
    # A run that fails half way (a corrupt state blob in the third batch) keeps the old output, no .tmp.
    states, _ = store_dump(tmp_path / "s.db")
    db = __import__("sqlite3").connect(tmp_path / "s.db")
    db.execute("UPDATE states SET state = ? WHERE user_id = ?", (b"\x00" * 40, sorted(states)[2]))
    db.commit()
    db.close()
    assert ksa_rec([*args, "--overwrite"]) == 1
    assert "corrupt state blob" in _error_line(capsys)
    assert output.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.glob("scores*")) == [output.name]


# ---- 4. typos that succeeded ---------------------------------------------------------------------------------
def test_score_from_a_store_that_does_not_exist(trained, tmp_path, capsys):
    checkpoint, _ = trained
    args = ["score", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out.parquet"), "--accelerator", "cpu"]
    assert ksa_rec([*args, "--state", str(tmp_path / "nosuch.db")]) == 1
    assert _error_line(capsys) == f"ksa-rec score: error: {tmp_path / 'nosuch.db'}: no such state store"
    (tmp_path / "notes.txt").write_text("not a store")
    assert ksa_rec([*args, "--state", str(tmp_path / "notes.txt")]) == 1
    assert "notes.txt: not a usable state store (file is not a database)" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command, flag, value", [
    ("stream", "--chunk-rows", "0"), ("stream", "--chunk-rows", "-5"), ("stream", "--top-k", "0"),
    ("stream", "--item-chunk", "many"), ("score", "--batch-size", "0"), ("score", "--top-k", "-1"),
    ("score", "--item-chunk", "0"),
])
def test_counts_must_be_positive(tmp_path, capsys, command, flag, value):
    args = {"stream": ["--events", "e.jsonl", "--state", str(tmp_path / "s.db")],
            "score": ["--events", "e.jsonl", "--output", str(tmp_path / "o.parquet")]}[command]
    with pytest.raises(SystemExit) as exit_:
        ksa_rec([command, "--checkpoint", "c.ckpt", *args, flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"ksa-rec {command}: error: argument {flag}: must be a positive integer, got {value!r} (see --help)\n"
    assert not list(tmp_path.iterdir())


def test_dead_letter_policy_needs_its_file(capsys):
    with pytest.raises(SystemExit):
        ksa_rec(["stream", "--checkpoint", "c", "--events", "e", "--state", "s", "--on-bad-event", "dead-letter"])
    assert capsys.readouterr().err == ("ksa-rec stream: error: --dead-letter FILE and --on-bad-event dead-letter go "
                                       "together (see --help)\n")


# ---- 5. late, duplicate and malformed events have a policy ---------------------------------------------------
BAD_ROWS = {3: "{not json}", 6: '{"user_id": "u0", "item_id": "i000001", "timestamp": 1, "category": "c"}',
            9: '{"user_id": "u1", "item_id": {"nested": 1}, "timestamp": 95, "category": "c"}',
            12: '{"user_id": "u2", "item_id": "i000002", "timestamp": NaN, "category": "c"}'}


def _events_with_bad_rows(tmp_path):
    good = [f'{{"user_id": "u{i % 3}", "item_id": "i00000{i % 9}", "timestamp": {10 * i}, "category": "c02"}}'
            for i in range(20)]
    mixed = list(good)
    for row, line in sorted(BAD_ROWS.items()):
        mixed.insert(row - 1, line)
    return _write(tmp_path / "mixed.jsonl", mixed), _write(tmp_path / "good.jsonl", good)


def test_skip_goes_past_bad_events_and_counts_them(trained, tmp_path, capsys):
    """Finding 5: a late event no longer blocks the stream for good."""
    checkpoint, _ = trained
    mixed, good = _events_with_bad_rows(tmp_path)
    assert stream(checkpoint, mixed, tmp_path / "s.db", "--chunk-rows", "5") == 1
    assert _error_line(capsys) == f"ksa-rec stream: error: {mixed}: row 3: not a JSON object: '{{not json}}' " \
                                  "(jsonl needs one object per line)"
    assert stream(checkpoint, mixed, tmp_path / "s.db", "--chunk-rows", "5", "--on-bad-event", "skip") == 0
    out = capsys.readouterr().out
    assert "ksa-rec stream: applied 20, replayed 0, duplicate 0, beyond_horizon 0, late 1, malformed 3, " \
           "unknown_items 0, unknown_categories 0, users 3\n" in out
    assert stream(checkpoint, good, tmp_path / "ref.db", "--chunk-rows", "5") == 0
    assert_same_store(checkpoint, tmp_path / "s.db", tmp_path / "ref.db", tol=1e-4)
    # restarted (the same input again): the bad rows are bad again, everything else a replay
    assert stream(checkpoint, mixed, tmp_path / "s.db", "--on-bad-event", "skip") == 0
    assert "applied 0, replayed 20, duplicate 0, beyond_horizon 0, late 1, malformed 3" in capsys.readouterr().out


def test_dead_letter_records_each_bad_event(trained, tmp_path):
    checkpoint, _ = trained
    mixed, _ = _events_with_bad_rows(tmp_path)
    dead = tmp_path / "dead.jsonl"
    assert stream(checkpoint, mixed, tmp_path / "s.db", "--on-bad-event", "dead-letter", "--dead-letter", str(dead),
                  "--summary", str(tmp_path / "summary.json")) == 0
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    assert sorted(r["row"] for r in records) == sorted(BAD_ROWS)
    by_row = {r["row"]: r for r in records}
    assert by_row[6]["kind"] == "late" and by_row[6]["column"] == "timestamp"
    assert json.loads(by_row[6]["raw"])["timestamp"] == 1
    assert all(by_row[r]["raw"] == BAD_ROWS[r] for r in (3, 9, 12))
    assert by_row[9]["reason"] == "nested JSON value '{\"nested\": 1}'; expected a string or number"
    assert all(r["file"] == str(mixed) for r in records)
    summary = _summary(tmp_path / "summary.json")
    assert (summary["late"], summary["malformed"], summary["applied"]) == (1, 3, 20)


def test_ml_100k_as_is_is_not_time_ordered(trained, tmp_path, capsys):
    """The README's ordering contract: u.data lists a user's ratings out of time order."""
    checkpoint, _ = trained
    path = tmp_path / "ratings.csv"  # u.data's four fields, as csv with our names (no category: OOV)
    path.write_text("user_id,item_id,rating,timestamp,category\n196,242,3,881250949,\n196,302,3,881250000,\n")
    assert stream(checkpoint, path, tmp_path / "s.db") == 1
    assert "row 2, column 'timestamp': timestamp 881250000 is before the user's previous event (881250949)" \
        in _error_line(capsys)


# ---- 8. unknown ids are counted -----------------------------------------------------------------------------
def test_unknown_items_skip_or_error(trained, tmp_path, capsys):
    checkpoint, _ = trained
    path = _write(tmp_path / "e.jsonl", [
        '{"user_id": "u1", "item_id": "i000001", "timestamp": 5, "category": "c02"}',
        '{"user_id": "u1", "item_id": "never-seen", "timestamp": 6, "category": "c02"}',
        '{"user_id": "u1", "item_id": "i000002", "timestamp": 7, "category": "c02"}'])
    assert stream(checkpoint, path, tmp_path / "e.db", "--on-unknown-item", "error") == 1
    assert _error_line(capsys).startswith(f"ksa-rec stream: error: {path}: row 2, column 'item_id': unknown item id "
                                          "'never-seen'")
    assert stream(checkpoint, path, tmp_path / "s.db", "--on-unknown-item", "skip") == 0
    assert "applied 2, " in capsys.readouterr().out and event_counts(checkpoint, tmp_path / "s.db") == {"u1": 2}
