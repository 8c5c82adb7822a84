"""A trained checkpoint, ready to serve: the plain model, its vocabularies and its identity."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ksa_rec.data.vocab import Vocab
from ksa_rec.errors import CheckpointError
from ksa_rec.models.seqrec import SeqRecModel

log = logging.getLogger(__name__)


@dataclass
class ServingModel:
    """``model`` in eval mode on ``device``; ``model_id`` identifies the weights and config, so state
    built by one checkpoint is refused by another."""

    model: SeqRecModel
    items: Vocab
    features: dict[str, Vocab]
    model_id: str
    checkpoint: str

    @property
    def device(self) -> torch.device:
        return self.model.item_weight.device

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             encoder_overrides: dict | None = None) -> "ServingModel":
        """Load a ``ksa-rec fit`` checkpoint; any unusable file is a one-line ``CheckpointError``.

        ``encoder_overrides``: encoder settings that change how the model runs, not what it computes
        (``attention_backend``); the model id stays that of the checkpoint."""
        from ksa_rec.training.checkpoints import check_weights, read_checkpoint
        from ksa_rec.training.module import CHECKPOINT_VOCAB_KEY, RecModule

        raw = read_checkpoint(path)
        vocab = raw.get(CHECKPOINT_VOCAB_KEY)
        if not vocab:
            raise CheckpointError(f"{path}: the checkpoint carries no vocabularies ('{CHECKPOINT_VOCAB_KEY}')")
        try:
            hparams = raw["hyper_parameters"]
            if encoder_overrides:
                hparams = {**hparams, "encoder": {**hparams["encoder"], **encoder_overrides}}
            module = RecModule(**hparams)
            check_weights(path, module.state_dict(), raw["state_dict"])
            module.load_state_dict(raw["state_dict"])
            items = Vocab.from_dict(vocab["items"], source=str(path))
            features = {k: Vocab.from_dict(v, source=str(path)) for k, v in vocab["features"].items()}
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: incompatible checkpoint: {str(err).splitlines()[0][:300]}") from None
        model = module.model.to(device).eval()
        return cls(model=model, items=items, features=features,
                   model_id=fingerprint(raw["hyper_parameters"], raw["state_dict"]), checkpoint=str(path))


def fingerprint(hparams: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """16 hex digits of a hash over the config and every weight's bytes."""
    digest = hashlib.blake2b(json.dumps(hparams, sort_keys=True, default=str).encode(), digest_size=8)
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
