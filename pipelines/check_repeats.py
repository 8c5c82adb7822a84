"""Are evaluation targets items the user already consumed? (issue 18: the seen-items mask)

Under ``model.eval.seen_items: mask`` a target that the user consumed before it is removed from its own
ranking with the rest of the history, and counts as a miss. The rule before that setting exempted the
target from its own mask, which leaks on exactly those targets. So a results table is the same under
both rules where no target repeats, and only there.

How to run (from the repository root):

    python pipelines/check_repeats.py --data-root ../shared/data
    python pipelines/check_repeats.py --only beauty ml-100k

Each dataset goes through the package's own ETL and the split of its shipped config (leave-one-out on
the real files, each user's last events on the synthetic data), as ``ksa-rec fit --config
configs/<config>.yaml`` builds them. Prints markdown: per dataset and split, the targets, how many are an
item of their own history, and how many users consumed some item twice; on data with a ``signal`` label
(the synthetic generator), the re-consumed targets by the pattern that planted them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Dataset:
    name: str
    config: str
    """A file of configs/ (without .yaml): its data settings and split are used."""
    data_file: str | None
    """Path under --data-root, or None for the synthetic generator."""
    overrides: tuple[str, ...] = ()


DATASETS = (
    Dataset("beauty", "beauty", "amazon-beauty/Beauty.txt"),
    Dataset("ml-100k", "ml-100k", "ml-100k/u.data"),
    Dataset("ml-latest-small", "ml-latest-small", "ml-latest-small/ratings.csv"),
    # SASRec's ML-1M (one line per user; ../shared/data has no raw ratings.dat).
    Dataset("ml-1m", "ml-1m", "ml-1m/ml-1m.txt", ("--data.format", "sasrec")),
    Dataset("synthetic-long-cpu", "synthetic-long-cpu", None),
)

SIGNAL_NAMES = {0: "background", 1: "short-range", 2: "series resumption", 3: "interest recurrence"}


def load(dataset: Dataset, data_root: Path, cache: str):
    """The config's DataModule for this dataset: ETL output and splits exactly as fit sees them."""
    from ksa_rec.training.cli import run_lightning

    args = ["--config", str(ROOT / "configs" / f"{dataset.config}.yaml"), "--data.cache_dir", cache,
            *dataset.overrides]
    if dataset.data_file:
        args += ["--data.path", str(data_root / dataset.data_file)]
    return run_lightning(args, run=False).datamodule


def events_frame(data) -> pl.DataFrame:
    """Every event as (user row, item), in each user's time order."""
    return pl.DataFrame({"user": np.repeat(np.arange(data.num_users), data.lengths()), "item": data.item_ids})


def targets_frame(data, targets) -> pl.DataFrame:
    """One row per target: user row, position, item, and whether the item occurs earlier in that
    user's history (its first occurrence is before the target's position)."""
    first_seen = (events_frame(data).with_columns(position=pl.int_range(pl.len()).over("user"))
                  .group_by("user", "item").agg(first=pl.col("position").min()))
    rows = data.offsets[targets.user] + targets.position
    frame = pl.DataFrame({"user": targets.user, "position": targets.position, "item": data.item_ids[rows]})
    if "signal" in data.labels:
        frame = frame.with_columns(signal=pl.Series(data.labels["signal"][rows]))
    return (frame.join(first_seen, on=["user", "item"], how="left", maintain_order="left")
            .with_columns(repeat=pl.col("first") < pl.col("position")))


def users_with_repeats(data) -> int:
    per_user = events_frame(data).group_by("user").agg(repeated=pl.col("item").n_unique() < pl.len())
    return int(per_user["repeated"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--only", nargs="*", help="dataset names to keep")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "ksa_rec"))
    args = parser.parse_args()
    rows, by_signal = [], []
    for dataset in DATASETS:
        if args.only and dataset.name not in args.only:
            continue
        dm = load(dataset, args.data_root, args.cache)
        data = dm.data
        users = f"{users_with_repeats(data):,} of {data.num_users:,}"
        for split in ("valid", "test"):
            frame = targets_frame(data, getattr(dm.splits, split))
            repeats = int(frame["repeat"].sum())
            rows.append(f"| {dataset.name} | {dm.config.split} | {split} | {frame.height:,} | {repeats:,} "
                        f"({repeats / max(frame.height, 1):.2%}) | {users} |")
            if "signal" in frame.columns:
                counts = frame.group_by("signal").agg(targets=pl.len(), repeats=pl.col("repeat").sum()).sort("signal")
                for signal, targets, repeats in counts.iter_rows():
                    by_signal.append(f"| {dataset.name} | {split} | {SIGNAL_NAMES.get(signal, signal)} | "
                                     f"{targets:,} | {repeats:,} ({repeats / targets:.2%}) |")
    print("| dataset | split | evaluation | targets | re-consumed targets | users who consumed an item twice |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if by_signal:
        print("\nRe-consumed targets by the pattern that planted them:\n")
        print("| dataset | evaluation | signal | targets | re-consumed |")
        print("|---|---|---|---|---|")
        print("\n".join(by_signal))


if __name__ == "__main__":
    main()
