"""Profile training steps of any config: where does a step's time go (host vs device, per op)?

How to run (from the repository root):

    python pipelines/profile_step.py --config configs/beauty.yaml --data.path ../shared/data/amazon-beauty/Beauty.txt

Extra arguments are LightningCLI arguments. Runs 5 warm-up and 20 profiled optimiser steps on the
configured accelerator, then prints steps/s and the top ops by self time (CPU and CUDA).
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ksa_rec.training.cli import run_lightning
from ksa_rec.training.module import build_adamw


def main(argv: list[str]) -> None:
    cli = run_lightning(argv, run=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = cli.model.to(device)
    module.trainer = None
    optimizer = build_adamw(module, module.optim_cfg)
    loader = _forever(cli.datamodule.train_dataloader())

    def step():
        batch = next(loader).to(device)
        loss = module.model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(20):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    print(f"{20 / elapsed:.1f} steps/s ({1000 * elapsed / 20:.1f} ms/step, profiled)")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def _forever(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main(sys.argv[1:])
