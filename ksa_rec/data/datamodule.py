"""Lightning DataModule: interaction log (or the built-in synthetic generator) -> batches.

The ETL runs once, on first access of ``data`` (also from ``LightningCLI`` argument links, which read
``data_spec`` to size the model's tables) and is cached on disk by the ETL itself.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from ksa_rec.data.etl import EtlConfig, InteractionData, load_interactions
from ksa_rec.data.schema import DataSpec, LogSchema
from ksa_rec.data.sequences import Collator, EpochSampler, EvalWindows, TrainWindows
from ksa_rec.data.split import Splits, leave_one_out, tail_split, temporal_cutoffs, temporal_split
from ksa_rec.data.synthetic import SyntheticConfig
from ksa_rec.data.synthetic import write as write_synthetic

log = logging.getLogger(__name__)

SYNTHETIC_FEATURES = ("category",)
SYNTHETIC_LABELS = ("evidence_distance", "signal")


@dataclass
class DataConfig:
    """Where the events come from and how they are cut into batches (validated on construction)."""

    path: str | None = None
    """Interaction log (parquet/csv/jsonl, MovieLens u.data/ratings.dat/ratings.csv, SASRec .txt)."""
    format: str = "auto"
    features: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    synthetic: SyntheticConfig | None = None
    """Used when ``path`` is None: the generator's events are written to the cache and read back."""
    split: str = "loo"
    """"loo" (leave-one-out), "temporal" (global time cut-offs at the last 20%/10% of events) or "tail"
    (each user's last ``tail_events`` events are test targets, the ones before validation targets)."""
    tail_events: int = 32
    max_len: int = 50
    chunk_size: int = 8
    time_gap_buckets: int = 0
    train_window: str = "last"
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    min_user_events: int = 1
    on_duplicate: str = "error"
    cache_dir: str | None = ".cache/ksa_rec"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.path is None and self.synthetic is None:
            raise ValueError("data: set data.path (an interaction log) or data.synthetic (the generator)")
        if self.split not in ("loo", "temporal", "tail"):
            raise ValueError(f"data.split: must be 'loo', 'temporal' or 'tail', got {self.split!r}")
        if self.split == "tail" and not 1 <= self.tail_events < self.max_len:
            raise ValueError(f"data.tail_events: must be in [1, max_len), got {self.tail_events}")
        if self.max_len < self.chunk_size:
            raise ValueError(f"data.max_len ({self.max_len}) must be >= data.chunk_size ({self.chunk_size})")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")


class RecDataModule(pl.LightningDataModule):
    """Batches of user histories for ``ksa-rec fit|validate|test``.

    Args mirror :class:`DataConfig` (flat, so the CLI reads ``--data.path``, ``--data.max_len``...).
    """

    def __init__(self, path: str | None = None, format: str = "auto", features: list[str] | None = None,
                 labels: list[str] | None = None, synthetic: SyntheticConfig | None = None, split: str = "loo",
                 tail_events: int = 32, max_len: int = 50, chunk_size: int = 8, time_gap_buckets: int = 0,
                 train_window: str = "last",
                 batch_size: int = 128, eval_batch_size: int = 256, num_workers: int = 0,
                 min_user_events: int = 1, on_duplicate: str = "error", cache_dir: str | None = ".cache/ksa_rec",
                 seed: int = 0):
        super().__init__()
        self.config = DataConfig(
            path=path, format=format, features=list(features or []), labels=list(labels or []),
            synthetic=synthetic, split=split, tail_events=tail_events, max_len=max_len, chunk_size=chunk_size,
            time_gap_buckets=time_gap_buckets, train_window=train_window, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, min_user_events=min_user_events,
            on_duplicate=on_duplicate, cache_dir=cache_dir, seed=seed)
        self.save_hyperparameters(asdict(self.config))

    # ---- processed data -------------------------------------------------------------------------
    @cached_property
    def data(self) -> InteractionData:
        cfg = self.config
        path, features, labels = cfg.path, tuple(cfg.features), tuple(cfg.labels)
        if path is None:
            path = str(self._synthetic_file())
            features = features or SYNTHETIC_FEATURES
            labels = labels or SYNTHETIC_LABELS
        etl = EtlConfig(path=path, format=cfg.format, schema=LogSchema(features=features, labels=labels),
                        min_user_events=cfg.min_user_events, on_duplicate=cfg.on_duplicate,
                        cache_dir=cfg.cache_dir)
        return load_interactions(etl)

    def _synthetic_file(self) -> Path:
        import hashlib
        import json

        syn = self.config.synthetic
        key = hashlib.sha256(json.dumps(asdict(syn), sort_keys=True).encode()).hexdigest()[:16]
        root = Path(self.config.cache_dir or ".cache/ksa_rec") / "synthetic"
        target = root / f"events-{key}.parquet"
        if not target.exists():
            log.info("generating synthetic events -> %s", target)
            root.mkdir(parents=True, exist_ok=True)
            write_synthetic(syn, target)
        return target

    @cached_property
    def splits(self) -> Splits:
        if self.config.split == "loo":
            return leave_one_out(self.data)
        if self.config.split == "tail":
            return tail_split(self.data, self.config.tail_events)
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
        cfg = self.config
        windows = TrainWindows(self.splits.train_len, cfg.max_len, cfg.chunk_size, cfg.train_window, cfg.seed)
        return self._loader(windows, cfg.batch_size, train=True, sampler=EpochSampler(len(windows), cfg.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits.valid)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits.test)

    def _eval_loader(self, targets) -> DataLoader:
        cfg = self.config
        return self._loader(EvalWindows(targets, cfg.max_len, cfg.chunk_size), cfg.eval_batch_size, train=False)

    def _loader(self, dataset, batch_size: int, train: bool, sampler=None) -> DataLoader:
        cfg = self.config
        collate = Collator(self.data, cfg.time_gap_buckets, train=train, labels=self.label_names)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                          drop_last=False)
