"""Quality study: train several (dataset, model) runs in parallel and tabulate their test metrics.

How to run (from the repository root):

    python pipelines/quality.py --study real --data-root ../shared/data --out docs/results/quality-real
    python pipelines/quality.py --study real --only beauty-full --max-time 00:00:20:00

Each run is ``ksa-rec fit --config configs/<cfg>.yaml ...`` in its own process (several share one GPU:
these models are small), logging under ``runs/<study>/<run>``. The script then writes ``<out>/results.md``
(a markdown table: HR/NDCG@{5,10,20}, MRR with 95% CIs, epochs, wall time) and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    name: str
    config: str
    data_file: str | None
    """Path relative to --data-root, or None for synthetic configs."""
    overrides: list[str] = field(default_factory=list)


# Hybrid-KSA on short public data: the window must be shorter than the histories for summaries to
# matter at all (KSA.md section 8: KSA only differs from full attention once n > W*k).
BEAUTY_KSA = ["--model.encoder.pattern", "ksa*3,full", "--model.encoder.chunk_size", "2", "--model.encoder.attention_backend", "torch",
              "--model.encoder.window", "4"]
ML_KSA = ["--model.encoder.pattern", "ksa*3,full", "--model.encoder.chunk_size", "8", "--model.encoder.attention_backend", "torch",
          "--model.encoder.window", "4"]

STUDIES: dict[str, list[Run]] = {
    "real": [
        Run("beauty-full", "beauty", "amazon-beauty/Beauty.txt"),
        Run("beauty-full-d03", "beauty", "amazon-beauty/Beauty.txt", ["--model.encoder.dropout", "0.3"]),
        Run("beauty-full-128", "beauty", "amazon-beauty/Beauty.txt", ["--model.encoder.dim", "128"]),
        Run("beauty-hybrid-ksa", "beauty", "amazon-beauty/Beauty.txt", BEAUTY_KSA),
        Run("ml-100k-full", "ml-100k", "ml-100k/u.data"),
        Run("ml-100k-hybrid-ksa", "ml-100k", "ml-100k/u.data", ML_KSA),
        Run("ml-latest-small-full", "ml-latest-small", "ml-latest-small/ratings.csv"),
        Run("ml-latest-small-hybrid-ksa", "ml-latest-small", "ml-latest-small/ratings.csv", ML_KSA),
    ],
}

METRICS = ["hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr"]


def launch(run: Run, study: str, data_root: Path, max_time: str | None, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    log_root = ROOT / "runs" / study / run.name
    log_root.mkdir(parents=True, exist_ok=True)
    # Each run works in its own directory (its runs/ lands there); the ETL cache is shared.
    args = [sys.executable, "-m", "ksa_rec.cli", "fit", "--config", str(ROOT / "configs" / f"{run.config}.yaml"),
            "--data.cache_dir", str(ROOT / ".cache" / "ksa_rec"), *run.overrides, *extra]
    if run.data_file:
        args += ["--data.path", str(data_root / run.data_file)]
    if max_time:
        args += ["--trainer.max_time", max_time]
    out = (log_root / "stdout.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=log_root, env=env)
    return proc, log_root


def collect(log_root: Path) -> dict | None:
    found = sorted(log_root.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def table(results: dict[str, dict]) -> str:
    head = "| run | " + " | ".join(METRICS) + " | users | epochs | wall s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 4)]
    for name, res in results.items():
        test = res.get("test") or {}
        if not test:
            lines.append(f"| {name} | " + " | ".join("-" for _ in METRICS) + f" | - | - | {res['wall_s']:.0f} |")
            continue
        cells = [f"{test[m]:.4f} ± {test[m + '_ci95']:.4f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {int(test['users'])} | {res.get('epochs', '-')} | {res['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), default="real")
    parser.add_argument("--only", nargs="*", help="run names to keep")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-time", help="Lightning max_time per run, DD:HH:MM:SS (then the best checkpoint is tested)")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("extra", nargs="*", help="extra ksa-rec fit arguments for every run (after --)")
    args = parser.parse_args()
    runs = [r for r in STUDIES[args.study] if not args.only or r.name in args.only]
    results: dict[str, dict] = {}
    pending = list(runs)
    active: list[tuple[Run, subprocess.Popen, Path, float]] = []
    while pending or active:
        while pending and len(active) < args.parallel:
            run = pending.pop(0)
            proc, log_root = launch(run, args.study, args.data_root, args.max_time, args.extra)
            active.append((run, proc, log_root, time.time()))
        time.sleep(2)
        for item in list(active):
            run, proc, log_root, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            res = collect(log_root) or {}
            res["wall_s"] = time.time() - started
            res["returncode"] = proc.returncode
            res["epochs"] = _epochs(log_root)
            results[run.name] = res
            print(f"{run.name}: exit {proc.returncode}, {res['wall_s']:.0f} s, "
                  f"test ndcg@10 {res.get('test', {}).get('ndcg@10', float('nan')):.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table(results) + "\n")
    print(table(results))
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


def _epochs(log_root: Path) -> int | None:
    import csv

    files = sorted(log_root.rglob("metrics.csv"))
    if not files:
        return None
    epochs = [int(float(r["epoch"])) for r in csv.DictReader(files[-1].open()) if r.get("epoch")]
    return max(epochs) + 1 if epochs else None


if __name__ == "__main__":
    sys.exit(main())
