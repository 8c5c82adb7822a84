"""Do trained KSA models use their summaries? Test the same weights with every summary visible and with
none (``max_summaries = 0``, which turns a ksa layer into sca), per distance-of-evidence bucket.

How to run (repository root):

    python pipelines/ablate_summaries.py --config configs/synthetic-long-cpu.yaml \\
        --run "ksa*2=runs/long-range-cpu/ksa*2" --run "ksa,full=runs/long-range-cpu/ksa,full"

``--run NAME=RUN_DIR`` takes the best checkpoint under RUN_DIR (the model as trained: pattern, summary
tokens and the rest come from the checkpoint; the data from ``--config``). Prints one markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl

from ksa_rec.training.cli import run_lightning
from ksa_rec.training.module import RecModule

METRIC = "hr@10"


def evaluate(config: str, checkpoint: Path, max_summaries: int | None, cache: str) -> dict:
    """Test metrics of the checkpoint's model (its own pattern, summary tokens, ...) on the config's data."""
    cli = run_lightning(["--config", config, "--data.cache_dir", cache], run=False)
    module = RecModule.load_from_checkpoint(checkpoint, map_location="cpu")
    module.encoder_cfg.max_summaries = max_summaries
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=cli.datamodule)
    return module.last_metrics["test"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR")
    p.add_argument("--cache", default=".cache/ksa_rec")
    args = p.parse_args()
    rows = []
    for spec in args.run:
        name, run_dir = spec.split("=")
        checkpoint = sorted(Path(run_dir).rglob("best-*.ckpt"))[-1]
        for label, m in (("all summaries", None), ("no summaries (max_summaries=0)", 0)):
            rows.append((name, label, evaluate(args.config, checkpoint, m, args.cache)))
    groups = [k.split("/")[0] for k in rows[0][2] if k.endswith(f"/{METRIC}")]
    print(f"| model | summaries at test | {METRIC} | " + " | ".join(groups) + " |")
    print("|---|---|---|" + "---|" * len(groups))
    for name, label, t in rows:
        cells = [f"{t[f'{g}/{METRIC}']:.3f} ± {t[f'{g}/{METRIC}_ci95']:.3f}" for g in groups]
        print(f"| {name} | {label} | {t[METRIC]:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
