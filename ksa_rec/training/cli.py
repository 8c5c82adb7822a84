"""``ksa-rec fit|validate|test`` through LightningCLI.

The data module is built first; its ``data_spec`` (table sizes from the vocabularies) is linked into the
model, and the model's chunk size into the data (truncation must keep whole chunks). Checkpointing and
early stopping watch validation NDCG@10 (``--checkpoint.*``, ``--early_stopping.*`` tune them). ``fit``
ends with a test pass on the best checkpoint, so one command prints validation and test metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from ksa_rec.data.datamodule import RecDataModule
from ksa_rec.training.module import RecModule

MONITOR = "val/ndcg@10"

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": [
        # The first logger's directory (runs/csv/version_N) also holds checkpoints and metrics.json.
        {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
        {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
         "init_args": {"save_dir": "runs", "name": "tensorboard"}},
    ],
}


class RecCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": MONITOR, "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.filename": "best-{epoch}"})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": MONITOR, "early_stopping.mode": "max",
                             "early_stopping.patience": 10})
        parser.link_arguments("model.encoder.chunk_size", "data.chunk_size", apply_on="parse")
        parser.link_arguments("model.encoder.time_gap_buckets", "data.time_gap_buckets", apply_on="parse")
        parser.link_arguments("data.data_spec", "model.data_spec", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.fast_dev_run or trainer.interrupted:
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        fit = {"epochs": trainer.current_epoch, "stopped_by": self._stop_reason()}
        trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)
        self.write_results(best, fit=fit)

    def _stop_reason(self) -> str:
        """Why fit ended: early_stopping (validation stopped improving: converged), max_epochs, or
        max_time (a time budget cut it short: not converged)."""
        trainer = self.trainer
        if trainer.early_stopping_callback is not None and trainer.early_stopping_callback.stopped_epoch > 0:
            return "early_stopping"
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch:
            return "max_epochs"
        if trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
            return "max_steps"
        return "max_time"

    def after_test(self) -> None:
        self.write_results(self.config[self.subcommand].get("ckpt_path") or "")

    def write_results(self, checkpoint: str, fit: dict | None = None) -> None:
        """Every metric of the last validation/test pass, with 95% CIs and user counts, and the evaluation
        protocol, as JSON (and, after fit, how many epochs ran and why training stopped)."""
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "metrics.json"
        if not self.trainer.is_global_zero:
            return  # several processes (sharded training) hold the same synced metrics: one writes them
        out.parent.mkdir(parents=True, exist_ok=True)
        extra = {"fit": fit} if fit else {}
        out.write_text(json.dumps({"checkpoint": checkpoint, "protocol": self.model.protocol(), **extra,
                                   **self.model.last_metrics}, indent=2))
        print(f"metrics with 95% CIs: {out}")


def run_lightning(args: list[str], run: bool = True) -> RecCLI:
    """Run one LightningCLI subcommand, e.g. ``["fit", "--config", "configs/smoke.yaml"]``; with
    ``run=False`` only parse and instantiate (no subcommand in ``args`` then)."""
    # TF32 matmuls on Ampere+ GPUs: ~1e-3 relative error, far below what ranking metrics resolve.
    torch.set_float32_matmul_precision("high")
    return RecCLI(RecModule, RecDataModule, args=args, run=run, trainer_defaults=TRAINER_DEFAULTS,
                  save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
