"""Several machines, simulated on this host: the README's two-node torchrun command
(pipelines/multinode_dry_run.py) and the check that a sharded checkpoint directory is shared by every process.

Two processes that work in different directories stand for two machines without a shared filesystem: a
relative checkpoint path then names a different folder in each, as ``runs/`` does on two machines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ksa_rec.errors import CheckpointError
from ksa_rec.training.sharded_checkpoint import ranks_missing, require_shared_directory

pytestmark = pytest.mark.slow  # starts processes

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_check_job(rank: int, port: int, base: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    # One folder for both processes: the check passes and leaves nothing behind.
    os.chdir(base)
    require_shared_directory(Path("together/checkpoints"), dist.group.WORLD)
    dist.barrier()  # rank 0 removes the probe after every process has looked: list the folder after that
    results["shared_left"] = sorted(p.name for p in Path(base, "together").rglob("*") if p.is_file())
    results["shared_dir_kept"] = Path("together/checkpoints").exists()
    # A folder of its own for each process (two machines, no shared filesystem).
    own = Path(base) / f"machine{rank}"
    own.mkdir()
    os.chdir(own)
    try:
        require_shared_directory(Path("runs/checkpoints"), dist.group.WORLD)
        results["apart_error"] = None
    except CheckpointError as err:
        results["apart_error"] = str(err)
    # What a load asks before reading: which processes miss the files rank 0 wrote.
    if rank == 0:
        Path("ckpt").mkdir()
        for name in (".metadata", "meta.pt"):
            (Path("ckpt") / name).touch()
    dist.barrier()
    results["missing"] = ranks_missing(Path("ckpt"), (".metadata", "meta.pt"), dist.group.WORLD)
    (Path(base) / f"result{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def test_checkpoint_directory_must_be_shared(tmp_path):
    mp.start_processes(_shared_check_job, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(WORLD)]
    for got in results:
        # Shared: no probe file left, and the folder the check created is gone again (nothing was saved in it).
        assert got["shared_left"] == [] and not got["shared_dir_kept"]
        # Apart: every process raises the same one-line error, naming the folder and the blind rank.
        assert got["apart_error"] == results[0]["apart_error"]
        assert got["apart_error"].startswith("runs/checkpoints: the process(es) of rank 1 do not see the files rank 0")
        assert "--trainer.default_root_dir" in got["apart_error"] and "\n" not in got["apart_error"]
        assert got["missing"] == [1]


def test_two_node_torchrun_dry_run(tmp_path):
    """pipelines/multinode_dry_run.py at its smallest (configs/sharded-smoke.yaml, one epoch): two torchrun
    launchers train one model, which loads, tests and scores on one process; apart, both refuse."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "pipelines/multinode_dry_run.py"), "--out", str(out), "--",
                           "--trainer.max_epochs", "1"], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = json.loads((out / "multinode_dry_run.json").read_text())
    assert len(report["checks"]) == 10 and all(report["checks"].values()), report["checks"]
    assert sorted(step["global_rank"] for step in report["fit"]) == [0, 1]
    assert [step["returncode"] for step in report["fit"]] == [0, 0]
    # One model: one shard file per rank, and 2 steps = 20 users per process in batches of 16 (a single
    # process would have taken 3 steps for the 40 users).
    assert report["checkpoints"]["last.ckpt"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert report["best_epoch_global_step"] == [0, 2]
    assert sum(name.endswith("metrics.json") for name in report["files"]) == 1
    # The same ranks on one process; the float64 sums of the metrics only add up in another order.
    assert report["one_process_test_metrics"] == pytest.approx(report["fit_test_metrics"], rel=1e-12, abs=0)
    assert report["fit_test_metrics"]["targets"] == 40
    assert report["scored_users"] == [40, 40]
    for step in report["unshared"]:
        assert step["returncode"] == 1 and "must be on a filesystem all of them mount" in step["error"]
    assert (out / "multinode_dry_run.md").read_text().count("| yes |") == 10
