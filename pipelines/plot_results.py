"""Plots for docs/results from the JSON the studies and benchmarks wrote (no figure without a run).

How to run (repository root):

    python pipelines/plot_results.py \\
        --long-range docs/results/raw/long-range-cpu-2026-11-22.json \\
        --serving docs/results/serving-cpu.json \\
        --training docs/results/raw/training-h100-2026-11-22.json \\
        --history Beauty=docs/results/raw/beauty-kinds-converged-2026-11-23.json \\
                  ML-100K=docs/results/raw/ml-100k-kinds-2026-11-23.json \\
                  ML-latest-small=docs/results/raw/ml-latest-small-kinds-2026-11-23.json --out docs/results

Writes ``quality-by-distance.png`` (HR@10 per model by distance of the long-range evidence),
``quality-by-history.png`` (HR@10 per attention kind by the user's history length, mean over seeds),
``state-bytes.png`` (bytes of streaming state per user vs history length, per model),
``training-speed.png`` (training events/s vs history length, per pattern; ``bench_training.py`` JSON) and
``kernels.png`` (attention ms vs L per method; ``--kernels`` takes one or more ``bench_kernels.py`` JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import mean_ci, seed_groups  # noqa: E402


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


def quality_by_history(studies: dict[str, dict], out: Path, metric: str = "hr@10", min_targets: int = 40) -> Path:
    """One panel per study (``quality.py`` results JSON of a kinds study): ``metric`` per bucket of
    history length for each model, the mean over seeds +- the 95% t half-width. The longest buckets
    are merged until each holds at least ``min_targets`` users."""
    fig, axes = plt.subplots(1, len(studies), figsize=(6.5 * len(studies), 4.8), constrained_layout=True, squeeze=False)
    for ax, (title, results) in zip(axes[0], studies.items()):
        groups = seed_groups(results)
        prefix = os.path.commonprefix(list(groups))
        prefix = prefix[:prefix.rfind("-") + 1]
        first = next(iter(groups.values()))[0]
        buckets = _merge_tail([k.split("/")[0] for k in first if k.startswith("hist_") and k.endswith("/targets")],
                              first, min_targets)
        for i, (model, tests) in enumerate(groups.items()):
            stats = [mean_ci([_pooled(t, merged, metric) for t in tests]) for merged in buckets]
            xs = [j + (i - len(groups) / 2) * 0.04 for j in range(len(buckets))]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[h or 0.0 for _, h in stats], marker="os^vD<>px"[i % 9],
                        capsize=2, linewidth=1.2, label=model[len(prefix):])
        labels = []
        for merged in buckets:
            lo = merged[0].split("_")[1]
            hi = merged[-1].split("_")[2]
            users = sum(int(first[f"{b}/targets"]) for b in merged)
            labels.append(f"{lo}+" if hi == "plus" else f"{lo}-{hi}")
            labels[-1] += f"\n{users} users"
        ax.set_xticks(range(len(buckets)), labels, fontsize=8)
        ax.set(xlabel="history length (events before the test target)", ylabel=f"test {metric.upper()}",
               title=f"{title}: mean of {len(next(iter(groups.values())))} seeds, 95% t-interval")
        ax.legend(fontsize=7, ncol=2)
    path = out / "quality-by-history.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _merge_tail(buckets: list[str], test: dict, min_targets: int) -> list[list[str]]:
    """Consecutive buckets, the longest ones merged until each group holds ``min_targets`` users."""
    merged: list[list[str]] = []
    for b in reversed(buckets):
        if merged and sum(test[f"{m}/targets"] for m in merged[-1]) < min_targets:
            merged[-1].insert(0, b)
        else:
            merged.append([b])
    if len(merged) > 1 and sum(test[f"{m}/targets"] for m in merged[-1]) < min_targets:
        shortest = merged.pop()  # the shortest histories are too few on their own: join the next bucket
        merged[-1] = shortest + merged[-1]
    return list(reversed(merged))


def _pooled(test: dict, buckets: list[str], metric: str) -> float:
    """``metric`` over the users of several buckets together (their user-weighted mean)."""
    users = [test[f"{b}/targets"] for b in buckets]
    return sum(test[f"{b}/{metric}"] * n for b, n in zip(buckets, users)) / sum(users)


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
    """Events/s of a whole training step vs events per user, one panel per configuration and label, one
    line per pattern (``bench_training.py`` JSON; the older one-configuration JSON too)."""
    rows = [r for r in report["rows"] if r.get("events_per_s")]
    panels = list(dict.fromkeys((r.get("config", "dim64"), r.get("label", "")) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), constrained_layout=True, squeeze=False)
    for ax, (config, label) in zip(axes[0], panels):
        mine = [r for r in rows if r.get("config", "dim64") == config and r.get("label", "") == label]
        for name in dict.fromkeys(r.get("pattern", r.get("model")) for r in mine):
            line = sorted((r for r in mine if r.get("pattern", r.get("model")) == name), key=lambda r: r["length"])
            ax.loglog([r["length"] for r in line], [r["events_per_s"] for r in line], marker="o", label=name)
        ax.set(xlabel="history length per user (events)", ylabel="training events / s",
               title=f"{config}{' ' + label if label else ''}: {_training_machine(report, label)}")
        ax.legend(fontsize=8)
    path = out / "training-speed.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _training_machine(report: dict, label: str) -> str:
    if "runs" in report:
        run = report["runs"][label]
        return f"{run['machine']['device']}, {run['tokens']:,} events per step"
    return f"{report['machine']}, {report['tokens']:,} events per step"


def kernels(reports: list[dict], out: Path) -> Path:
    """ms vs L, log-log, one panel per batch kind (solid: forward+backward, dashed: forward), from one or
    more ``bench_kernels.py`` JSON files (runs made in pieces plot together)."""
    rows = [r for report in reports for r in report["rows"] if r["fwd_ms"] is not None or r["fwd_bwd_ms"] is not None]
    kinds = sorted({r["kind"] for r in rows}, key=lambda kind: kind != "uniform")

    def name(r: dict) -> str:
        return f"{r['method']} [{r['setting']}]" if r["setting"] else r["method"]

    methods = list(dict.fromkeys(name(r) for r in rows))
    colors = plt.get_cmap("tab20").colors  # one color per method, in every panel
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 6.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, method in enumerate(methods):
            pts = sorted((r for r in rows if r["kind"] == kind and name(r) == method), key=lambda r: r["L"])
            for key, style in (("fwd_bwd_ms", "-o"), ("fwd_ms", "--x")):
                xy = [(r["L"], r[key]) for r in pts if r[key] is not None]
                if xy:
                    ax.plot(*zip(*xy), style, color=colors[i % len(colors)],
                            label=f"{method} {'fwd+bwd' if key == 'fwd_bwd_ms' else 'fwd'}")
        ax.set(xscale="log", yscale="log", xlabel="L (events per user, B*L fixed)", ylabel="ms", title=kind)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.3, 1, 1))  # room for the shared legend below the panels
    path = out / "kernels.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-range", type=Path)
    p.add_argument("--serving", type=Path)
    p.add_argument("--training", type=Path)
    p.add_argument("--kernels", type=Path, nargs="+", help="bench_kernels.py JSON file(s), plotted together")
    p.add_argument("--history", nargs="+", metavar="TITLE=RESULTS_JSON",
                   help="kinds-study results (quality.py) to plot by history length, one panel each")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.history:
        studies = {title: json.loads(Path(path).read_text())
                   for title, _, path in (h.partition("=") for h in args.history)}
        print(quality_by_history(studies, args.out))
    if args.long_range:
        print(quality_by_distance(json.loads(args.long_range.read_text()), args.out))
    if args.serving:
        print(state_bytes(json.loads(args.serving.read_text()), args.out))
    if args.training:
        print(training_speed(json.loads(args.training.read_text()), args.out))
    if args.kernels:
        print(kernels([json.loads(path.read_text()) for path in args.kernels], args.out))


if __name__ == "__main__":
    main()
