"""Plots for docs/results from the JSON the studies and benchmarks wrote (no figure without a run).

How to run (repository root):

    python pipelines/plot_results.py \\
        --long-range docs/results/raw/long-range-cpu-2026-11-22.json \\
        --serving docs/results/serving-cpu.json \\
        --training docs/results/raw/training-h100-2026-11-22.json --out docs/results

Writes ``quality-by-distance.png`` (HR@10 per model by distance of the long-range evidence),
``state-bytes.png`` (bytes of streaming state per user vs history length, per model) and
``training-speed.png`` (training events/s vs history length, per model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def quality_by_distance(results: dict, out: Path, metric: str = "hr@10") -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for name, res in results.items():
        test = res.get("test") or {}
        groups = [k.split("/")[0] for k in test if k.endswith(f"/{metric}") and k.startswith("dist_")]
        if not groups:
            continue
        xs = list(range(len(groups)))
        ys = [test[f"{g}/{metric}"] for g in groups]
        err = [test[f"{g}/{metric}_ci95"] for g in groups]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xticks(xs, [g.replace("dist_", "").replace("_plus", "+").replace("_", "-") for g in groups])
    ax.set(xlabel="events between target and its evidence", ylabel=f"test {metric.upper()}",
           title="Long-range targets: quality by distance of the evidence")
    ax.legend(fontsize=8)
    path = out / "quality-by-distance.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def state_bytes(rows: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["history"])
        ax.loglog([r["history"] for r in mine], [r["state_bytes"] for r in mine], marker="o", label=model)
    ax.set(xlabel="history length (events)", ylabel="streaming state bytes per user",
           title="Per-user state vs history (dim 64, 4 layers, k=8, W=32)")
    ax.legend(fontsize=8)
    path = out / "state-bytes.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_speed(report: dict, out: Path) -> Path:
    """Events/s of a whole training step vs events per user, per model (``bench_training.py`` JSON)."""
    rows = [r for r in report["rows"] if r.get("events_per_s")]
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["length"])
        ax.loglog([r["length"] for r in mine], [r["events_per_s"] for r in mine], marker="o", label=model)
    ax.set(xlabel="history length per user (events)", ylabel="training events / s",
           title=f"Training throughput, {report['machine']} ({report['tokens']:,} events per step)")
    ax.legend(fontsize=8)
    path = out / "training-speed.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-range", type=Path)
    p.add_argument("--serving", type=Path)
    p.add_argument("--training", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args()
    if args.long_range:
        print(quality_by_distance(json.loads(args.long_range.read_text()), args.out))
    if args.serving:
        print(state_bytes(json.loads(args.serving.read_text()), args.out))
    if args.training:
        print(training_speed(json.loads(args.training.read_text()), args.out))


if __name__ == "__main__":
    main()
