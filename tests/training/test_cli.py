"""LightningCLI wiring: every shipped config instantiates; a fast_dev_run fit and a short fit end to end."""

import json
from pathlib import Path

import pytest

from ksa_rec.training.cli import run_lightning

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# A tiny file in the format each config expects: 6 users x 12 events, 20 items.
USERS, EVENTS = 6, 12


def _events():
    for u in range(1, USERS + 1):
        for t in range(EVENTS):
            yield u, 1 + (u * 7 + t * 3) % 20, 1_000_000 + 60 * t


def _write(path: Path, fmt: str) -> Path:
    if fmt == "sasrec":
        lines = {}
        for u, i, _ in _events():
            lines.setdefault(u, []).append(str(i))
        path.write_text("".join(f"{u} {' '.join(items)}\n" for u, items in lines.items()))
    elif fmt == "ml-100k":
        path.write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in _events()))
    elif fmt == "ml-dat":
        path.write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in _events()))
    elif fmt == "ml-csv":
        path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{t}\n" for u, i, t in _events()))
    else:
        raise AssertionError(f"no sample writer for format {fmt}")
    return path


def _data_args(config: Path, tmp_path: Path) -> list[str]:
    import yaml

    data = yaml.safe_load(config.read_text()).get("data", {})
    args = ["--data.cache_dir", str(tmp_path / "cache")]
    if data.get("synthetic") is None:
        fmt = data["format"]
        name = {"sasrec": "Beauty.txt", "ml-100k": "u.data", "ml-dat": "ratings.dat", "ml-csv": "ratings.csv"}[fmt]
        args += ["--data.path", str(_write(tmp_path / name, fmt))]
    return args


def test_every_shipped_config_is_covered():
    names = {c.stem for c in CONFIGS}
    assert {"smoke", "demo", "beauty", "ml-100k", "ml-latest-small", "ml-1m", "ml-20m", "synthetic-long"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "synthetic" in (cfg := config.read_text()) and "path: null" not in cfg and config.stem != "smoke":
        # Big synthetic configs: shrink the generator, the point is that the YAML parses and wires up.
        extra = ["--data.synthetic.num_users", "8", "--data.synthetic.min_length", "200",
                 "--data.synthetic.max_length", "300"]
    else:
        extra = []
    cli = run_lightning(["--config", str(config), *_data_args(config, tmp_path), *extra], run=False)
    assert cli.model.data_spec.num_items == cli.datamodule.data.num_items
    assert cli.datamodule.config.chunk_size == cli.model.encoder_cfg.chunk_size
    assert sum(p.numel() for p in cli.model.parameters()) > 0


def test_fast_dev_run_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_lightning(["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--trainer.fast_dev_run", "true",
                         "--data.cache_dir", str(tmp_path / "cache")])
    assert cli.trainer.state.finished
    assert cli.trainer.callback_metrics["train/loss_step"] > 0


def test_fit_trains_checkpoints_and_tests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_lightning(["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--trainer.max_epochs", "3",
                         "--data.cache_dir", str(tmp_path / "cache")])
    metrics_file = Path(cli.trainer.log_dir) / "metrics.json"
    results = json.loads(metrics_file.read_text())
    assert Path(results["checkpoint"]).is_file()
    assert results["test"]["targets"] == 40 and 0.0 <= results["test"]["ndcg@10"] <= 1.0
    assert results["fit"] == {"epochs": 3, "stopped_by": "max_epochs"}
    assert results["protocol"] == {"seen_items": "mask"}  # what the results tables name
    # Test targets broken down by history length (events before each user's last one), bucket edges
    # (8, 16, 32, 64, 128, ...): the counts follow the users' lengths.
    lengths = cli.datamodule.data.lengths() - 1
    for lo, hi in [(32, 64), (64, 128)]:
        expected = int(((lengths >= lo) & (lengths < hi)).sum())
        assert results["test"].get(f"hist_{lo}_{hi}/targets", 0) == expected
    hist_targets = sum(v for k, v in results["test"].items() if k.startswith("hist_") and k.endswith("/targets"))
    assert hist_targets == 40 and 0 < results["test"].get("hist_64_128/targets", 0) < 40
    # The loss went down and the checkpoint carries the vocabularies serving needs.
    import csv

    import torch

    rows = [r for r in csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open()) if r.get("train/loss_epoch")]
    assert len(rows) == 3 and float(rows[-1]["train/loss_epoch"]) < float(rows[0]["train/loss_epoch"])
    ckpt = torch.load(results["checkpoint"], map_location="cpu", weights_only=True)
    assert set(ckpt["ksa_rec_vocab"]) == {"items", "features"}
    assert "category" in ckpt["ksa_rec_vocab"]["features"]


@pytest.mark.parametrize("args,reason", [
    # no validation ever improves by 1.0: the second check stops training
    (["--early_stopping.min_delta", "1.0", "--early_stopping.patience", "1"], "early_stopping"),
    (["--trainer.max_time", "00:00:00:01"], "max_time"),
])
def test_metrics_say_why_fit_stopped(tmp_path, monkeypatch, args, reason):
    monkeypatch.chdir(tmp_path)
    cli = run_lightning(["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--trainer.max_epochs", "50",
                         "--data.cache_dir", str(tmp_path / "cache"), "--model.eval.seen_items", "keep", *args])
    results = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert results["fit"]["stopped_by"] == reason and results["fit"]["epochs"] < 50
    assert results["protocol"] == {"seen_items": "keep"}
    assert results["test"]["targets"] == 40
