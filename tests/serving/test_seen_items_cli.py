"""``--seen-items mask|keep`` (and ``--include-seen``, its older name) on ``ksa-rec score`` and ``stream``."""

import polars as pl
import pytest

from ksa_rec.cli import main as ksa_rec
from ksa_rec.serving.cli import score_parser, stream_parser

REQUIRED = {score_parser: ["--checkpoint", "c", "--events", "e", "--output", "o"],
            stream_parser: ["--checkpoint", "c", "--events", "e", "--state", "s"]}


@pytest.mark.parametrize("parser", [score_parser, stream_parser], ids=["score", "stream"])
def test_seen_items_flags(parser, capsys):
    required = REQUIRED[parser]
    assert parser().parse_args(required).seen_items == "mask"
    assert parser().parse_args([*required, "--seen-items", "keep"]).seen_items == "keep"
    assert parser().parse_args([*required, "--include-seen"]).seen_items == "keep"
    assert parser().parse_args([*required, "--include-seen", "--seen-items", "mask"]).seen_items == "mask"
    with pytest.raises(SystemExit):
        parser().parse_args([*required, "--seen-items", "exempt"])
    assert "invalid choice: 'exempt'" in capsys.readouterr().err


def _score(checkpoint, events, output, *extra) -> pl.DataFrame:
    assert ksa_rec(["score", "--checkpoint", str(checkpoint), "--events", str(events), "--output", str(output),
                    "--accelerator", "cpu", "--top-k", "1000000", *extra]) == 0
    return pl.read_parquet(output)


def test_score_masks_or_keeps_what_each_user_consumed(trained, event_files, tmp_path):
    """Asking for more than the catalogue lists every eligible item: under mask exactly the items a user
    never consumed, under keep all of them."""
    checkpoint, events = trained
    path, frame = event_files
    catalogue = {str(i) for i in events["item_id"].unique().to_list()}
    consumed = {u: {str(i) for i in g["item_id"].to_list()} for (u,), g in frame.group_by("user_id")}
    masked = _score(checkpoint, path, tmp_path / "mask.parquet")
    kept = _score(checkpoint, path, tmp_path / "keep.parquet", "--seen-items", "keep")
    alias = _score(checkpoint, path, tmp_path / "alias.parquet", "--include-seen")
    assert alias.sort("user_id").equals(kept.sort("user_id"))
    for row in masked.iter_rows(named=True):
        assert set(row["item_ids"]) == catalogue - consumed[row["user_id"]]
    for row in kept.iter_rows(named=True):
        assert set(row["item_ids"]) == catalogue
