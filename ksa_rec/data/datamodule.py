"""Lightning DataModule: interaction log (or the built-in synthetic generator) -> batches.

The ETL runs once, on first access of ``data`` (also from ``LightningCLI`` argument links, which read
``data_spec`` to size the model's tables) and is cached on disk by the ETL itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from ksa_rec.data.etl import DuplicatePolicy, EtlConfig, InteractionData, load_interactions
from ksa_rec.data.readers import Format
from ksa_rec.data.schema import DataSpec, LogSchema
from ksa_rec.data.sequences import Collator, EpochSampler, EvalWindows, TrainWindows
from ksa_rec.data.split import Splits, leave_one_out, tail_split, temporal_cutoffs, temporal_split
from ksa_rec.data.synthetic import SyntheticConfig
from ksa_rec.data.synthetic import write as write_synthetic

log = logging.getLogger(__name__)

SYNTHETIC_FEATURES = ("category",)
SYNTHETIC_LABELS = ("evidence_distance", "signal")

Split = Literal["loo", "temporal", "tail"]
TrainWindow = Literal["last", "random"]


class RecDataModule(pl.LightningDataModule):
    """Batches of user histories for ``ksa-rec fit|validate|test`` (an interaction log or the generator).

    Validated on construction (one-line ``ValueError``); the options are this ``__init__``'s arguments.
    """

    def __init__(self, path: str | None = None, format: Format = "auto", features: list[str] | None = None,
                 labels: list[str] | None = None, synthetic: SyntheticConfig | None = None, split: Split = "loo",
                 tail_events: int = 32, max_len: int = 50, chunk_size: int = 8, time_gap_buckets: int = 0,
                 train_window: TrainWindow = "last", batch_size: int = 128, eval_batch_size: int = 256,
                 num_workers: int = 0, min_user_events: int = 1, on_duplicate: DuplicatePolicy = "error",
                 cache_dir: str | None = ".cache/ksa_rec", seed: int = 0):
        """
        Args:
            path: Interaction log (parquet/csv/jsonl, MovieLens u.data/ratings.dat/ratings.csv, SASRec .txt);
                null: the synthetic generator's events.
            format: How to read path; auto decides from the file name and header.
            features: Categorical side-feature columns embedded next to the item (synthetic: category).
            labels: Integer columns carried to evaluation untouched (synthetic: evidence_distance, signal).
            synthetic: The generator's settings, used when path is null (its events are cached, then read back).
            split: loo (each user's last event is the test target, the one before it validation), temporal
                (global time cut-offs at the last 20% / 10% of events) or tail (each user's last tail_events
                events are test targets, the tail_events before them validation targets).
            tail_events: Targets per user and split with split tail.
            max_len: Most events of a history the model sees (the newest, cut at whole chunks).
            chunk_size: Events per KSA chunk; linked from model.encoder.chunk_size.
            time_gap_buckets: Buckets of log2 time gaps (0: none); linked from model.encoder.time_gap_buckets.
            train_window: The max_len training events of a longer history: last (the newest) or random (a
                random end, drawn again every epoch).
            batch_size: Users per training batch.
            eval_batch_size: Users per validation / test batch.
            num_workers: DataLoader worker processes (0: batches are built in the training process).
            min_user_events: Users with fewer events are dropped by the ETL.
            on_duplicate: Exact duplicate (user, item, timestamp) rows: error, drop (keep the first) or keep.
            cache_dir: Where processed data and synthetic events are cached; null: no cache.
            seed: Seed of the random training windows and of the order of users in each epoch.
        """
        super().__init__()
        self.save_hyperparameters()
        self.synthetic = synthetic
        # Plain data in hparams (checkpoints must load weights-only), however the module was built.
        self.hparams.synthetic = asdict(synthetic) if synthetic is not None else None
        self._check()
        self.etl = self._etl_config()

    def _check(self) -> None:
        hp = self.hparams
        if hp.path is None and self.synthetic is None:
            raise ValueError("data: set data.path (an interaction log) or data.synthetic (the generator)")
        if hp.split not in get_args(Split):
            raise ValueError(f"data.split: must be one of {', '.join(get_args(Split))}, got {hp.split!r}")
        if hp.train_window not in get_args(TrainWindow):
            raise ValueError(f"data.train_window: must be one of {', '.join(get_args(TrainWindow))}, "
                             f"got {hp.train_window!r}")
        if hp.split == "tail" and not 1 <= hp.tail_events < hp.max_len:
            raise ValueError(f"data.tail_events: must be in [1, max_len), got {hp.tail_events}")
        if hp.max_len < hp.chunk_size:
            raise ValueError(f"data.max_len ({hp.max_len}) must be >= data.chunk_size ({hp.chunk_size})")
        if hp.batch_size < 1 or hp.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        if hp.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {hp.num_workers}")

    def _etl_config(self) -> EtlConfig:
        """The ETL's settings (which validate format, on_duplicate and min_user_events)."""
        hp = self.hparams
        path, features, labels = hp.path, tuple(hp.features or ()), tuple(hp.labels or ())
        if path is None:
            path = str(self._synthetic_file())
            features, labels = features or SYNTHETIC_FEATURES, labels or SYNTHETIC_LABELS
        return EtlConfig(path=path, format=hp.format, schema=LogSchema(features=features, labels=labels),
                         min_user_events=hp.min_user_events, on_duplicate=hp.on_duplicate, cache_dir=hp.cache_dir)

    # ---- processed data -------------------------------------------------------------------------
    @cached_property
    def data(self) -> InteractionData:
        target = Path(self.etl.path)
        if self.hparams.path is None and not target.exists():
            log.info("generating synthetic events -> %s", target)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_synthetic(self.synthetic, target)
        return load_interactions(self.etl)

    def _synthetic_file(self) -> Path:
        """Where the generator's events for ``synthetic`` are cached (keyed by a hash of its settings)."""
        key = hashlib.sha256(json.dumps(self.hparams.synthetic, sort_keys=True).encode()).hexdigest()[:16]
        return Path(self.hparams.cache_dir or ".cache/ksa_rec") / "synthetic" / f"events-{key}.parquet"

    @cached_property
    def splits(self) -> Splits:
        if self.hparams.split == "loo":
            return leave_one_out(self.data)
        if self.hparams.split == "tail":
            return tail_split(self.data, self.hparams.tail_events)
        valid_start, test_start = temporal_cutoffs(self.data)
        return temporal_split(self.data, valid_start, test_start)

    @property
    def data_spec(self) -> DataSpec:
        """Table sizes for the model (read by the CLI's argument link)."""
        return DataSpec(num_items=self.data.num_items,
                        feature_cardinalities={k: len(v) for k, v in self.data.features.items()})

    def item_probability(self) -> np.ndarray:
        """Frequency of each item id among training events (for the logQ correction), ``[num_items]``."""
        data, train_len = self.data, self.splits.train_len
        in_train = np.arange(data.num_events) - np.repeat(data.offsets[:-1], data.lengths()) < np.repeat(
            train_len, data.lengths())
        counts = np.bincount(data.item_ids[in_train], minlength=data.num_items).astype(np.float64)
        return counts / max(counts.sum(), 1.0)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.data.labels)

    # ---- loaders ---------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        cfg = self.hparams
        windows = TrainWindows(self.splits.train_len, cfg.max_len, cfg.chunk_size, cfg.train_window, cfg.seed)
        return self._loader(windows, cfg.batch_size, train=True, sampler=EpochSampler(len(windows), cfg.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits.valid)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits.test)

    def _eval_loader(self, targets) -> DataLoader:
        cfg = self.hparams
        return self._loader(EvalWindows(targets, cfg.max_len, cfg.chunk_size), cfg.eval_batch_size, train=False)

    def _loader(self, dataset, batch_size: int, train: bool, sampler=None) -> DataLoader:
        cfg = self.hparams
        collate = Collator(self.data, cfg.time_gap_buckets, train=train, labels=self.label_names)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                          drop_last=False)
