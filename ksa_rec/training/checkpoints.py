"""Reading a checkpoint file without trusting it: local files only, weights-only unpickling, one-line errors.

Every checkpoint ksa_rec reads comes through :func:`read_checkpoint` (``score``, ``stream``, and the
``--ckpt_path`` of ``fit``/``validate``/``test`` before Lightning loads it, itself weights-only). A
checkpoint is a pickle: unpickled without ``weights_only`` it can run any code, so a file that holds
anything but tensors and plain data is refused, and so is a URL (its content can change between the
check and the load).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ksa_rec.errors import CheckpointError

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
"""``scheme://...``: http, https, s3, gs, hdfs, file and every other fsspec/torch.hub location."""
NAMES_SHOWN = 3
"""Weight names an incompatibility message lists before "and N more"."""


def refuse_url(location: str | Path) -> None:
    if URL.match(str(location)):
        raise CheckpointError(f"{location}: checkpoints are read from local files only (what a URL serves can "
                              "change after it is checked, and a checkpoint can carry code); download it first")


def read_checkpoint(location: str | Path) -> dict[str, Any]:
    """The dict ``torch.save`` wrote to a local file, unpickled weights-only with its tensors memory-mapped
    (nothing is read until used). Anything else is a one-line ``CheckpointError``."""
    refuse_url(location)
    path = Path(location)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        what = "an empty file" if path.stat().st_size == 0 else "not a torch.save archive"
        raise CheckpointError(f"{path}: not a readable checkpoint ({what})")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: it holds more than tensors and plain data, and loading it "
                              f"could run code ({_unpickler_reason(err)})") from None
    except Exception as err:  # torch raises many types for a damaged archive; report any of them in one line
        raise CheckpointError(f"{path}: not a readable checkpoint ({_describe(err)})") from None
    if not isinstance(raw, dict) or "state_dict" not in raw or "hyper_parameters" not in raw:
        raise CheckpointError(f"{path}: not a ksa-rec checkpoint (no state_dict/hyper_parameters)")
    return raw


def check_weights(location: str | Path, expected: Mapping[str, torch.Tensor],
                  found: Mapping[str, torch.Tensor]) -> None:
    """``CheckpointError`` naming the missing, unexpected and reshaped weights, unless ``found`` (the
    checkpoint's) has exactly the names and shapes of ``expected`` (the model's)."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = [f"{name} {list(found[name].shape)} (model: {list(expected[name].shape)})"
                for name in sorted(expected.keys() & found.keys()) if found[name].shape != expected[name].shape]
    problems = [f"{label} {_some(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)) if names]
    if problems:
        raise CheckpointError(f"{location}: incompatible checkpoint (built by another version or for other "
                              f"data): {'; '.join(problems)}")


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown if len(names) <= NAMES_SHOWN else f"{shown} and {len(names) - NAMES_SHOWN} more"


def _unpickler_reason(err: Exception) -> str:
    """torch's weights-only refusal is a paragraph; its reason is the line after 'WeightsUnpickler error:'."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return _describe(err)


def _describe(err: Exception) -> str:
    """``Type: first line of the message`` (just ``Type`` for an empty message, e.g. ``EOFError()``)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
