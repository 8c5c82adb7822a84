"""Sharded checkpoints: one directory per checkpoint, loadable by any number of processes, and its export
to a single-process Lightning checkpoint.

Layout (Lightning's ModelCheckpoint still names the directory ``*.ckpt``)::

    best-epoch=3.ckpt/
      .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP): "state_dict" (the tables as
                                     ShardedTensors, dense tensors written once) and "fused_optimizer"
                                     (the tables' optimizer states, sharded like the tables)
      meta.pt                        the rest of the Lightning checkpoint (hyper-parameters, vocabulary,
                                     loop and callback states, the dense AdamW state), written by rank 0

DCP reshards on load, so a checkpoint written by N processes loads on M of them, M = 1 included (into
plain unsharded tensors, no process group needed). Export for the single-process ``score``/``stream``
commands (and ``RecModule.load_from_checkpoint``)::

    python -m ksa_rec.training.sharded_checkpoint runs/csv/version_0/checkpoints/best-epoch=3.ckpt model.ckpt
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.optim import Optimizer

from ksa_rec.errors import CheckpointError
from ksa_rec.training.module import RecModule

META_FILE = "meta.pt"
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
"""Left out of an export: they resume a sharded run and do not fit a single-process one."""


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / META_FILE).is_file()


SHARED_FILESYSTEM_HINT = ("a sharded checkpoint is one directory that every process writes its shards into and "
                          "reads them back from, so with several machines it must be on a filesystem all of them "
                          "mount at the same path (set --trainer.default_root_dir or --checkpoint.dirpath, and "
                          "--ckpt_path, to such a path)")


def ranks_missing(directory: Path, names: Iterable[str], group: dist.ProcessGroup) -> list[int]:
    """Ranks of ``group`` on which one of ``names`` is not a file in ``directory``. Collective."""
    here = all((directory / name).is_file() for name in names)
    seen: list[bool | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, here, group=group)
    return [rank for rank, ok in enumerate(seen) if not ok]


def require_shared_directory(directory: Path, group: dist.ProcessGroup) -> None:
    """Raise ``CheckpointError`` on every process unless every process of ``group`` sees the files rank 0
    writes in ``directory``. Collective.

    Without a shared filesystem each machine would keep only its own shards and training would run to its
    first checkpoint load (the test after fit, a resume) before failing; this finds out before training.
    The probe's name is random, so a probe left by a killed run cannot pass for this one."""
    first = dist.get_rank(group) == 0
    created = False
    token = [uuid.uuid4().hex if first else None]
    if first:
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f".shared-check-{token[0]}").touch()
    # The broadcast leaves rank 0 only after the probe exists, so no process looks before it is there.
    dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
    probe = directory / f".shared-check-{token[0]}"
    blind = ranks_missing(directory, [probe.name], group)  # returns once every process has looked
    if first:
        probe.unlink()
        if created and not any(directory.iterdir()):
            directory.rmdir()  # ModelCheckpoint creates it when it first saves; a run that never saves leaves none
    if blind:
        raise CheckpointError(f"{directory}: the process(es) of rank {', '.join(map(str, blind))} do not see the "
                              f"files rank 0 writes there: {SHARED_FILESYSTEM_HINT}")


def save_sharded_checkpoint(checkpoint: dict[str, Any], path: Path, fused_optimizer: Optimizer,
                            group: dist.ProcessGroup) -> None:
    """Write a Lightning checkpoint dict whose ``state_dict`` holds ShardedTensors. Collective."""
    rest = dict(checkpoint)
    tensors = {"state_dict": rest.pop("state_dict"), "fused_optimizer": fused_optimizer.state_dict()}
    is_first = dist.get_rank(group) == 0
    if is_first and path.is_file():
        path.unlink()  # a single-file checkpoint of the same name from an earlier run
    dist.barrier(group=group)
    dcp.save(tensors, checkpoint_id=path, process_group=group)
    if is_first:
        torch.save(rest, path / META_FILE)
    dist.barrier(group=group)  # meta.pt exists before any process goes on to read the checkpoint


def load_sharded_checkpoint(path: Path, module: nn.Module, fused_optimizer: Optimizer | None,
                            group: dist.ProcessGroup, weights_only: bool | None = None) -> dict[str, Any]:
    """Load the module state (and, given one, the tables' optimizer state) into a sharded ``module``, on any
    number of processes. Collective. Returns the rest of the Lightning checkpoint."""
    state = {"state_dict": module.state_dict()}
    if fused_optimizer is not None:
        state["fused_optimizer"] = fused_optimizer.state_dict()
    dcp.load(state, checkpoint_id=path, process_group=group)
    module.load_state_dict(state["state_dict"])
    if fused_optimizer is not None:
        fused_optimizer.load_state_dict(state["fused_optimizer"])
    return torch.load(path / META_FILE, map_location="cpu", weights_only=weights_only)


def load_unsharded(path: Path) -> RecModule:
    """A plain single-process :class:`RecModule` (unsharded tables) from a sharded checkpoint directory."""
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path}: not a sharded checkpoint directory (no .metadata and {META_FILE})")
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    module = RecModule(**meta["hyper_parameters"])
    module.on_load_checkpoint(meta)
    state = {"state_dict": module.state_dict()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    module.load_state_dict(state["state_dict"])
    return module


def export_single_process(path: Path, output: Path) -> Path:
    """Sharded checkpoint directory -> one Lightning checkpoint file with unsharded tables (weights,
    hyper-parameters, vocabulary; no optimizer or loop state)."""
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    checkpoint = {key: value for key, value in meta.items() if key not in TRAINING_STATE_KEYS}
    checkpoint["state_dict"] = load_unsharded(path).state_dict()
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ksa_rec.training.sharded_checkpoint",
                                     description="Export a sharded checkpoint directory (TorchRecStrategy) to a "
                                                 "single-process Lightning checkpoint file.")
    parser.add_argument("checkpoint", type=Path, help="sharded checkpoint directory (e.g. best-epoch=0.ckpt/)")
    parser.add_argument("output", type=Path, help="checkpoint file to write")
    args = parser.parse_args(argv)
    if not is_sharded_checkpoint(args.checkpoint):
        print(f"error: {args.checkpoint}: not a sharded checkpoint directory", file=sys.stderr)
        return 2
    print(f"wrote {export_single_process(args.checkpoint, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
