"""LightningModule around :class:`SeqRecModel`: losses, full-catalogue metrics, optimisers, vocabularies
in checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pytorch_lightning as pl
import torch
from torch import Tensor

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import DataSpec
from ksa_rec.models.ranking import SEEN_ITEMS, SeenItems, target_ranks
from ksa_rec.models.seqrec import SeqRecModel
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.losses import LossConfig
from ksa_rec.training.metrics import RankingMetrics
from ksa_rec.utils.config import coerce

CHECKPOINT_VOCAB_KEY = "ksa_rec_vocab"
EVIDENCE_LABEL = "evidence_distance"


@dataclass
class OptimConfig:
    """AdamW on the dense weights (and the embeddings, unless sharded tables bring their own optimizer)."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, on weight matrices only (not on biases, norms or other 1-d weights)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW's moment decay rates (beta1, beta2)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from lr / warmup_steps to lr (0: none); then constant, or cosine."""
    cosine_steps: int = 0
    """Optimizer steps of cosine decay from lr to lr / 10 after the warm-up (0: constant lr)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.cosine_steps < 0:
            raise ValueError("optim: lr must be > 0; weight_decay, warmup_steps, cosine_steps >= 0")


@dataclass
class EvalConfig:
    item_chunk: int = 65536
    """Items scored at once when ranking the full catalogue (bounds memory at eval_batch x item_chunk)."""
    seen_items: SeenItems = "mask"
    """Items the user consumed before the target: "mask" removes them all from the ranking, the target too
    (a re-consumed target is then a miss; the published protocol), "keep" ranks them (repeat-aware)."""
    distance_edges: tuple[int, ...] = (64, 264, 1024)
    """Buckets of ``evidence_distance`` for the long-range breakdown (when the data has that label)."""
    history_edges: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
    """Buckets of history length (events before the target, before truncation) for the test breakdown
    of quality by how much a user has done; empty: no breakdown."""

    def __post_init__(self) -> None:
        if self.item_chunk < 1:
            raise ValueError(f"model.eval.item_chunk: must be >= 1, got {self.item_chunk}")
        if self.seen_items not in SEEN_ITEMS:
            raise ValueError(f"model.eval.seen_items: must be one of {', '.join(SEEN_ITEMS)}, got {self.seen_items!r}")


class RecModule(pl.LightningModule):
    """Trains and evaluates a next-item model. ``data_spec`` is linked from the DataModule by the CLI."""

    def __init__(self, encoder: EncoderConfig = EncoderConfig(), loss: LossConfig = LossConfig(),
                 optim: OptimConfig = OptimConfig(), eval: EvalConfig = EvalConfig(),
                 data_spec: DataSpec | None = None):
        super().__init__()
        if data_spec is None:
            raise ValueError("model.data_spec is required (the CLI links it from the data)")
        self.encoder_cfg = coerce(EncoderConfig, encoder)
        self.loss_cfg = coerce(LossConfig, loss)
        self.optim_cfg = coerce(OptimConfig, optim)
        self.eval_cfg = coerce(EvalConfig, eval)
        self.data_spec = coerce(DataSpec, data_spec)
        # Plain dicts in hparams: checkpoints stay loadable with weights_only and readable as YAML.
        self.save_hyperparameters({"encoder": asdict(self.encoder_cfg), "loss": asdict(self.loss_cfg),
                                   "optim": asdict(self.optim_cfg), "eval": asdict(self.eval_cfg),
                                   "data_spec": asdict(self.data_spec)})
        self.model = SeqRecModel(self.encoder_cfg, self.loss_cfg, self.data_spec)
        self.vocab: dict | None = None
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.val_metrics = RankingMetrics()
        self.test_metrics = RankingMetrics(self.distance_groups() + self.history_groups())

    # ---- data hand-over ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        if stage == "fit" and hasattr(dm, "item_probability"):
            prob = torch.as_tensor(dm.item_probability(), dtype=torch.float32)
            self.model.item_prob.copy_(prob.to(self.model.item_prob.device))
        if hasattr(dm, "data"):
            data = dm.data
            self.vocab = {"items": data.items.to_dict(),
                          "features": {k: v.to_dict() for k, v in data.features.items()}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.vocab is not None:
            checkpoint[CHECKPOINT_VOCAB_KEY] = self.vocab

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.vocab = checkpoint.get(CHECKPOINT_VOCAB_KEY)

    # ---- steps -------------------------------------------------------------------------------------
    def training_step(self, batch: SequenceBatch, batch_idx: int) -> Tensor:
        loss = self.model.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch.batch_size)
        self._log_router_weights(batch.batch_size)
        return loss

    def _log_router_weights(self, batch_size: int) -> None:
        """Mean routing weight per memory level of every mka/fastmka layer (collapse shows up here)."""
        for i, block in enumerate(self.model.encoder.blocks):
            mean = getattr(block.attn, "last_router_mean", None)
            if mean is not None:
                self.log_dict({f"router/l{i}/{level}": mean[j] for j, level in enumerate(("local", "session", "long"))},
                              on_step=False, on_epoch=True, batch_size=batch_size)

    def protocol(self) -> dict[str, str]:
        """The evaluation settings a results table must name (written into metrics.json)."""
        return {"seen_items": self.eval_cfg.seen_items}

    def _ranks(self, batch: SequenceBatch) -> Tensor:
        vecs = self.model.encode(batch)[batch.eval_rows]
        masked = self.eval_cfg.seen_items == "mask"
        seen_values, seen_offsets = (batch.seen_values, batch.seen_offsets) if masked else (None, None)
        if self.model.sharded_items is not None:  # each process scores the item rows it holds
            return self.model.sharded_items.target_ranks(vecs, batch.eval_targets, seen_values, seen_offsets,
                                                         self.eval_cfg.item_chunk)
        return target_ranks(*self.model.head(vecs), batch.eval_targets, seen_values, seen_offsets,
                            self.eval_cfg.item_chunk)

    def validation_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self.val_metrics.update(self._ranks(batch))

    def test_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        groups = []
        if EVIDENCE_LABEL in batch.labels:
            groups.append(self.distance_group(batch.labels[EVIDENCE_LABEL]))
        if self.eval_cfg.history_edges:
            # The history groups follow the distance groups in the metric's group list.
            history = batch.positions[batch.eval_rows] + 1
            groups.append(len(self.distance_groups()) + self.history_group(history))
        self.test_metrics.update(self._ranks(batch), *groups)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, split: str, metric: RankingMetrics) -> None:
        values = metric.compute()
        metric.reset()
        self.last_metrics[split] = values
        for name, value in values.items():
            if name.endswith(("_ci95", "targets")):
                continue  # kept in last_metrics / the results JSON, not in the console table
            self.log(f"{split}/{name}", value, prog_bar=name in ("ndcg@10", "hr@10"))

    # ---- test breakdowns: by distance of the long-range evidence, by history length -----------------
    def distance_groups(self) -> tuple[str, ...]:
        return ("no_long_range",) + _bucket_names("dist", self.eval_cfg.distance_edges)

    def distance_group(self, distance: Tensor) -> Tensor:
        """``evidence_distance [B]`` (-1 = none) -> index into ``distance_groups()``."""
        edges = torch.tensor(self.eval_cfg.distance_edges, device=distance.device)
        bucket = 1 + torch.bucketize(distance, edges, right=True)
        return torch.where(distance < 1, torch.zeros_like(bucket), bucket)

    def history_groups(self) -> tuple[str, ...]:
        return _bucket_names("hist", self.eval_cfg.history_edges) if self.eval_cfg.history_edges else ()

    def history_group(self, history: Tensor) -> Tensor:
        """``history [B]`` (events before each target, >= 1) -> index into ``history_groups()``."""
        return torch.bucketize(history, torch.tensor(self.eval_cfg.history_edges, device=history.device), right=True)

    # ---- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = build_adamw(self, cfg)
        if not cfg.warmup_steps and not cfg.cosine_steps:
            return optimizer

        def factor(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            if cfg.cosine_steps:
                t = min(1.0, (step - cfg.warmup_steps) / cfg.cosine_steps)
                return 0.1 + 0.45 * (1 + math.cos(math.pi * t))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """The training optimizer of ``model`` (``fit`` and the benchmarks use this one): AdamW, weight decay on
    weight matrices only, the fused kernel when the parameters are on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).device.type == "cuda"
    # The fused CUDA kernel: one launch per step instead of several per parameter.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=on_cuda)


def _bucket_names(prefix: str, edges: tuple[int, ...]) -> tuple[str, ...]:
    """``("p_1_e0", "p_e0_e1", ..., "p_eN_plus")``: half-open buckets [lo, hi) of values >= 1."""
    bounds = [1, *edges]
    return (*(f"{prefix}_{lo}_{hi}" for lo, hi in zip(bounds[:-1], bounds[1:])), f"{prefix}_{bounds[-1]}_plus")
