"""``ksa-rec fit|validate|test`` through LightningCLI.

The data module is built first; its ``data_spec`` (table sizes from the vocabularies) is linked into the
model, and the model's chunk size into the data (truncation must keep whole chunks). Checkpointing and
early stopping watch validation NDCG@10 (``--checkpoint.*``, ``--early_stopping.*`` tune them). ``fit``
ends with a test pass on the best checkpoint, so one command prints validation and test metrics.

Logs, checkpoints and metrics.json go under ``--trainer.default_root_dir`` (``runs/``). A bad option or
value is one ``ConfigError`` line; a ``--ckpt_path`` is read by ``read_checkpoint`` (local files only,
weights-only) and checked against the model before Lightning loads it, itself weights-only.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentError, set_parsing_settings
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from ksa_rec.data.datamodule import RecDataModule
from ksa_rec.errors import ConfigError, KsaRecError
from ksa_rec.training import LIGHTNING_COMMANDS
from ksa_rec.training.checkpoints import check_weights, read_checkpoint, refuse_url
from ksa_rec.training.module import RecModule
from ksa_rec.training.report import print_results

MONITOR = "val/ndcg@10"
DEFAULT_ROOT_DIR = "runs"
LIGHTNING_CHECKPOINT_NAMES = ("best", "last", "hpc")
"""``--ckpt_path`` values Lightning resolves itself to checkpoints of the current run (not files)."""
NO_BEST_CHECKPOINT = {
    "no_validation": "no validation ran (trainer.limit_val_batches is 0, or training ended before the first "
                     "validation), so no best checkpoint was chosen; test scored the final weights",
    "none_kept": "validation ran but no checkpoint was kept (checkpoint.save_top_k is 0, or validation "
                 "NDCG@10 was never a number); test scored the final weights",
    "no_ckpt_path": "no --ckpt_path was given: the model's initial, untrained weights were scored",
}
"""metrics.json's ``checkpoint_reason`` when ``checkpoint`` is null."""


def default_loggers(root: str) -> list:
    """CSV (metrics.csv; its version directory also holds the checkpoints and metrics.json) and
    TensorBoard, both under ``root``."""
    return [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tensorboard")]


class DropSanityCheckMetrics(Callback):
    """The sanity check scores the untrained model on two batches: not a validation result, so it must
    not reach metrics.json (where a ``val`` block then always means a real validation epoch)."""

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        pl_module.last_metrics.pop("val", None)


TRAINER_DEFAULTS = {"default_root_dir": DEFAULT_ROOT_DIR, "callbacks": [DropSanityCheckMetrics()]}


class RecCLI(LightningCLI):
    """LightningCLI for :class:`RecModule` and :class:`RecDataModule` with ksa_rec's defaults, checks and summary."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Not options: every checkpoint load is weights-only, and print_results replaces Lightning's table.
        fixed = {"weights_only", "verbose"}
        return {name: skip | fixed for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": MONITOR, "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.filename": "best-{epoch}"})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        # Checked when validation ends (not when a training epoch ends): with no validation (limit_val_batches
        # 0, check_val_every_n_epoch beyond the run) it then never asks for a metric that does not exist.
        parser.set_defaults({"early_stopping.monitor": MONITOR, "early_stopping.mode": "max",
                             "early_stopping.patience": 10, "early_stopping.check_on_train_epoch_end": False})
        parser.link_arguments("model.encoder.chunk_size", "data.chunk_size", apply_on="parse")
        parser.link_arguments("model.encoder.time_gap_buckets", "data.time_gap_buckets", apply_on="parse")
        parser.link_arguments("data.data_spec", "model.data_spec", apply_on="instantiate")
        parser.add_argument("--print_buckets", type=bool, default=False,
                            help="Also print the test metrics per bucket of history length and evidence "
                                 "distance (metrics.json always holds them).")

    def parse_arguments(self, parser, args) -> None:
        # run_lightning always passes the arguments (ksa_rec.cli.main takes its own --debug out of them), so
        # Lightning's warning about ``args`` given next to a non-empty sys.argv never applies.
        self.config = parser.parse_args(args)
        self.ckpt_file = self._read_ckpt_path()

    def _parse_ckpt_path(self) -> None:
        """Lightning rebuilds ``model`` from the ``--ckpt_path`` checkpoint's hyper-parameters, over what the command
        gave. That is right for what the weights were trained as (encoder, loss, optimiser), not for how they are
        scored: ``model.eval`` (the seen-item rule, the bucket edges) stays the command's, so one checkpoint can be
        tested under another protocol than the one it was trained with, and the command never silently loses it."""
        subcommand = self.config.get("subcommand")
        evaluation = self.config[subcommand]["model"]["eval"] if subcommand else None
        super()._parse_ckpt_path()
        if evaluation is not None:
            self.config[subcommand]["model"]["eval"] = evaluation

    def _read_ckpt_path(self) -> dict | None:
        """The ``--ckpt_path`` file, read safely now so that a bad one fails in one line before anything runs."""
        subcommand = self.config.get("subcommand")
        location = self.config[subcommand].get("ckpt_path") if subcommand else None
        if location is None or location in LIGHTNING_CHECKPOINT_NAMES:
            return None
        refuse_url(location)
        if Path(location).is_dir():
            return None  # a sharded checkpoint: TorchRecStrategy reads it, weights-only
        return read_checkpoint(location)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except KsaRecError:
            raise
        except (ValueError, MisconfigurationException) as err:  # the configs validate themselves on construction
            raise ConfigError(one_line(str(err))) from err

    def instantiate_trainer(self, **kwargs):
        trainer_config = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        if trainer_config.get("logger") in (None, True):  # no loggers chosen: ours, under default_root_dir
            kwargs.setdefault("logger", default_loggers(trainer_config.get("default_root_dir") or DEFAULT_ROOT_DIR))
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        if self.ckpt_file is not None:
            location = self.config[self.subcommand]["ckpt_path"]
            check_weights(location, self.model.state_dict(), self.ckpt_file["state_dict"])
            self.ckpt_file = None  # Lightning reads the file again to restore it; let the mapping go

    # The subcommands, run by LightningCLI (it calls the method named after the subcommand).
    def fit(self, **kwargs) -> None:
        started = time.perf_counter()
        self.trainer.fit(**kwargs, weights_only=True)
        self.fit_seconds = time.perf_counter() - started

    def validate(self, **kwargs) -> None:
        self.trainer.validate(**kwargs, verbose=False, weights_only=True)

    def test(self, **kwargs) -> None:
        self.trainer.test(**kwargs, verbose=False, weights_only=True)

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.fast_dev_run or trainer.interrupted:
            return
        best = self._kept_best()
        fit = {"epochs": trainer.current_epoch, "stopped_by": self._stop_reason(),
               "seconds": round(self.fit_seconds, 1)}
        score = trainer.checkpoint_callback.best_model_score if best else None
        if score is not None:  # what model selection compares: the monitored validation metric of the kept checkpoint
            fit["best_val"] = {trainer.checkpoint_callback.monitor: float(score)}
        reason = None if best else "none_kept" if "val" in self.model.last_metrics else "no_validation"
        trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False,
                     weights_only=True)
        self.report(best or None, reason, fit=fit)

    def _kept_best(self) -> str:
        """The file of the best checkpoint the checkpoint callback kept ("" when none).

        A run resumed (``--ckpt_path``) from another working directory restores the first run's best path, which is
        relative to *that* directory when ``default_root_dir`` was. When it names no file here, the file of that name
        beside the resumed checkpoint is the one meant: a run keeps its checkpoints in one folder. Otherwise the path
        stays as kept (on an unshared filesystem another rank may hold the file)."""
        callback = self.trainer.checkpoint_callback
        best = callback.best_model_path if callback else ""
        resumed = self.config[self.subcommand].get("ckpt_path")
        if not best or Path(best).exists() or resumed is None or resumed in LIGHTNING_CHECKPOINT_NAMES:
            return best
        beside = Path(resumed).parent / Path(best).name
        return str(beside) if beside.is_file() else best

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

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:
            print_results("validate", {"val": self.model.last_metrics["val"]}, None)

    def after_test(self) -> None:
        checkpoint = self.config[self.subcommand].get("ckpt_path")
        self.report(checkpoint, None if checkpoint else "no_ckpt_path")

    def report(self, checkpoint: str | None, reason: str | None, fit: dict | None = None) -> None:
        """metrics.json: every metric of the last validation/test pass with 95% CIs and target counts, which
        checkpoint was scored (or why none), and after fit how many epochs ran and why training stopped;
        then the summary on the console."""
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "metrics.json"  # collective: all ranks
        if not self.trainer.is_global_zero:
            return  # several processes (sharded training) hold the same synced metrics: one writes them
        results = {"checkpoint": checkpoint, **({"checkpoint_reason": NO_BEST_CHECKPOINT[reason]} if reason else {}),
                   "protocol": self.model.protocol(), **({"fit": fit} if fit else {}), **self.model.last_metrics}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print_results(self.subcommand, results, out, buckets=self.config[self.subcommand]["print_buckets"])


def one_line(message: str) -> str:
    """jsonargparse's multi-line messages as one line: ``key: reason``.

    'Parser key "K":' heads a message about option K. A value that fits none of a Union's types lists
    one error per type: the real reasons are those that are not just "Expected a <type>" (a dataclass
    that refused the value); when every type merely did not match, say which types were expected.
    """
    message = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", message).replace("NoneType", "null")
    message = re.sub(r"typing\.Literal\[([^]]*)\]", lambda m: "one of " + m.group(1).replace("'", ""), message)
    lines = [line.strip() for line in message.splitlines() if line.strip()] or ["invalid configuration"]
    head = re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', lines[0])
    prefix, body = (f"{head.group(1)}: ", [head.group(2)] * bool(head.group(2)) + lines[1:]) if head else ("", lines)
    if "Errors:" not in body:
        mismatch = re.fullmatch(r"Expected a (.+)\. Got value: (.*)", " ".join(body))
        return prefix + (f"expected {mismatch.group(1)}, got {mismatch.group(2)!r}" if mismatch else " ".join(body))
    errors = [line[2:] for line in body if line.startswith("- ")]
    reasons = [error for error in errors if not error.startswith("Expected a ")]
    if reasons:
        return prefix + "; ".join(reasons)
    given = next((line.split(":", 1)[1].strip() for line in body if line.startswith("Given value:")), "?")
    expected = " or ".join(error.removeprefix("Expected a ") for error in errors)
    return f"{prefix}expected {expected}, got {given!r}"


def run_lightning(args: list[str], run: bool = True) -> RecCLI:
    """Run one LightningCLI subcommand, e.g. ``["fit", "--config", "configs/smoke.yaml"]``; with
    ``run=False`` only parse and instantiate (no subcommand in ``args`` then). A bad option or value
    raises ``ConfigError`` (one line), a bad ``--ckpt_path`` ``CheckpointError``."""
    # TF32 matmuls on Ampere+ GPUs: ~1e-3 relative error, far below what ranking metrics resolve.
    torch.set_float32_matmul_precision("high")
    # Help then shows each dataclass field's docstring (EncoderConfig, SyntheticConfig, ...); reading them
    # adds about 0.4 s to every parse, so only when help is asked for.
    wants_help = any(arg in ("-h", "--help") or arg.split("=")[0].endswith(".help") for arg in args)
    set_parsing_settings(docstring_parse_attribute_docstrings=wants_help)
    try:
        return RecCLI(RecModule, RecDataModule, args=args, run=run, trainer_defaults=TRAINER_DEFAULTS,
                      parser_kwargs={"exit_on_error": False}, save_config_kwargs={"overwrite": True},
                      auto_configure_optimizers=False)
    except ArgumentError as err:
        raise ConfigError(one_line(str(err))) from err
