"""The README's demo: train on the built-in synthetic data on CPU, then print validation and test metrics.

How to run (from the repository root, after `make venv`; `make demo` does both):

    .venv/bin/python pipelines/demo.py [extra LightningCLI args, e.g. --trainer.max_epochs=2]

Checkpoints, CSV/TensorBoard logs and metrics.json land under runs/; the generated events under .cache/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ksa_rec.cli import main as ksa_rec

ROOT = Path(__file__).resolve().parents[1]


def run(extra: list[str]) -> int:
    started = time.time()
    code = ksa_rec(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), *extra])
    print(f"demo: finished in {time.time() - started:.0f} s; checkpoints, logs and metrics.json under runs/")
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
