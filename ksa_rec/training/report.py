"""What ``fit``, ``validate`` and ``test`` print when they end: a headline table (HR@10 and NDCG@10 with
95% intervals, for validation and test), how training went, where the checkpoint and metrics.json are;
and, on request, the test metrics per bucket. It reads the same dict that metrics.json holds, so the
console never says something the file does not.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

HEADLINE = (("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"))
"""(metric key, column title) of the headline table."""
SPLITS = (("val", "validation"), ("test", "test"))
"""(results key, row title), in the order a run produces them."""
STOP_REASONS = {
    "early_stopping": "validation NDCG@10 stopped improving (early stopping)",
    "max_epochs": "it reached trainer.max_epochs",
    "max_steps": "it reached trainer.max_steps",
    "max_time": "trainer.max_time ran out (not converged)",
}
BUCKET_FAMILIES = {"hist": "history length", "dist": "evidence distance"}
"""Prefixes of the test-bucket names (``RecModule``'s breakdowns) -> what the bucket counts, in events."""
BUCKET_NAMES = {"no_long_range": "no long-range evidence"}
"""Test buckets outside the families, by name."""


def print_results(command: str, results: dict, metrics_file: Path | None, buckets: bool = False) -> None:
    """The end-of-run summary on stdout; ``buckets`` adds the per-bucket test table."""
    console = Console()
    console.print(_headline(command, results))
    if "fit" in results:
        fit = results["fit"]
        print(f"training: {fit['epochs']} epoch(s); it stopped because {STOP_REASONS[fit['stopped_by']]}")
    if "checkpoint" in results:
        print(f"checkpoint: {results['checkpoint'] or 'none; ' + results['checkpoint_reason']}")
    if buckets and "test" in results:
        console.print(_bucket_table(results["test"]))
    if metrics_file is not None:
        hint = "" if buckets else " (print them with --print_buckets true)"
        print(f"every metric, per bucket, with 95% intervals: {metrics_file}{hint}")


def _headline(command: str, results: dict) -> Table:
    table = Table(title=f"ksa-rec {command}", caption="± : half-width of the 95% interval over the targets")
    table.add_column("split")
    table.add_column("targets", justify="right")
    for _, title in HEADLINE:
        table.add_column(title, justify="right")
    for key, title in SPLITS:
        if key in results:
            table.add_row(title, *_cells(results[key], ""))
    return table


def _bucket_table(test: dict) -> Table:
    table = Table(title="test, per bucket (half-open ranges of events)")
    table.add_column("bucket")
    table.add_column("targets", justify="right")
    for _, title in HEADLINE:
        table.add_column(title, justify="right")
    groups = dict.fromkeys(key.split("/")[0] for key in test if "/" in key)  # first-seen order
    for group in groups:
        table.add_row(_bucket_label(group), *_cells(test, f"{group}/"))
    return table


def _cells(metrics: dict, prefix: str) -> list[str]:
    values = [f"{metrics[prefix + key]:.4f} ± {metrics[prefix + key + '_ci95']:.4f}" for key, _ in HEADLINE]
    return [f"{int(metrics[prefix + 'targets']):,}", *values]


def _bucket_label(name: str) -> str:
    """``hist_32_64`` -> ``history length [32, 64)``; ``dist_1024_plus`` -> ``evidence distance >= 1024``."""
    family, _, bounds = name.partition("_")
    if family not in BUCKET_FAMILIES:
        return BUCKET_NAMES.get(name, name)
    lo, hi = bounds.split("_")
    return f"{BUCKET_FAMILIES[family]} " + (f">= {lo}" if hi == "plus" else f"[{lo}, {hi})")
