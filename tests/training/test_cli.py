"""LightningCLI wiring: every shipped config instantiates; a fast_dev_run fit and a short fit end to end; what
the command prints (one-line errors, the closing summary, --help) and where it writes (metrics.json)."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tqdm import tqdm

from ksa_rec.cli import main
from ksa_rec.training.cli import run_lightning

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SMOKE = str(ROOT / "configs/smoke.yaml")

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
    assert cli.datamodule.hparams.chunk_size == cli.model.encoder_cfg.chunk_size
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
    assert metrics_file.resolve() == tmp_path / "runs/csv/version_0/metrics.json"  # the default root: runs/
    results = json.loads(metrics_file.read_text())
    assert Path(results["checkpoint"]).is_file()
    assert results["test"]["targets"] == 40 and 0.0 <= results["test"]["ndcg@10"] <= 1.0
    fit = results["fit"]
    assert (fit["epochs"], fit["stopped_by"]) == (3, "max_epochs") and fit["seconds"] > 0
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
    # Model selection reads the kept checkpoint's validation score: the best of the validation epochs.
    val = [float(r["val/ndcg@10"]) for r in csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open())
           if r.get("val/ndcg@10")]
    assert fit["best_val"] == {"val/ndcg@10": pytest.approx(max(val))}
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


# ---- one-line errors -------------------------------------------------------------------------------------
def _fit(tmp_path: Path, *args: str) -> list[str]:
    return ["fit", "--config", SMOKE, "--data.cache_dir", str(tmp_path / "cache"), *args]


@pytest.mark.parametrize("args,expected", [
    (["--data.format", "xlsx"], ("data.format: expected one of auto, parquet, csv, jsonl, ml-100k, ml-dat, ml-csv, "
                                 "sasrec, got 'xlsx'")),
    (["--model.encoder.pattern", "full,bogus"], "pattern 'full,bogus': unknown attention kind 'bogus'"),
    (["--data.synthetic", "null"], "data: set data.path (an interaction log) or data.synthetic (the generator)"),
    (["--data.max_len", "abc"], "data.max_len: expected int, got 'abc'"),
    (["--data.max_len", "2"], "data.max_len (2) must be >= data.chunk_size (4)"),
    (["--model.optim.lr", "-1"], "optim: lr must be > 0"),
    (["--trainer.max_epochs", "x"], "trainer.max_epochs: expected int or null, got 'x'"),
    (["--data.synthetic.num_users", "-1"], "SyntheticConfig.num_users=-1: must be >= 1"),
    (["--data.nosuch", "1"], "unrecognized arguments: --data.nosuch 1"),
    (["--config", "nosuch.yaml"], "config: File does not exist"),
], ids=["format", "pattern", "no-data", "not-a-number", "max-len", "lr", "union", "dataclass", "unknown-key",
        "config-file"])
def test_config_errors_are_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(_fit(tmp_path, *args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ksa-rec fit: error: ") and err.count("\n") == 1 and expected in err


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["--data.nosuch", "1"], "unrecognized arguments"),  # refused by the parser
    (["--data.synthetic", "null"], "set data.path"),      # refused by RecDataModule, after the seed is set
])
def test_config_error_stderr_is_exactly_one_line(tmp_path, args, expected):
    command = [sys.executable, "-m", "ksa_rec.cli", *_fit(tmp_path, *args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksa-rec fit: error: ") and expected in lines[0], done.stderr
    # --debug keeps the traceback.
    debug = subprocess.run([*command, "--debug"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError" in debug.stderr.splitlines()[-1]


def test_no_warning_about_args_next_to_sys_argv(tmp_path, monkeypatch):
    """Lightning warns when ``args`` and sys.argv both hold arguments, which is always the case when the
    console script passes on its own arguments."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ksa-rec", "--config", SMOKE])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_lightning(["--config", SMOKE, "--data.cache_dir", str(tmp_path / "cache")], run=False)
    assert not [w for w in caught if "args" in str(w.message) and "sys.argv" in str(w.message)]


def _screen(text: str) -> list[str]:
    """The rows a terminal shows for ``text``: '\\r' returns to column 0, later characters overwrite."""
    rows = []
    for line in text.split("\n"):
        row: list[str] = []
        column = 0
        for char in line:
            if char == "\r":
                column = 0
                continue
            row[column:column + 1] = [char]
            column += 1
        rows.append("".join(row).rstrip())
    return rows


def test_an_error_never_shares_a_line_with_a_progress_bar(tmp_path, monkeypatch):
    terminal = io.StringIO()  # stdout and stderr on one terminal
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = tqdm(total=10, desc="Predicting", file=sys.stdout)  # as a failed run leaves Lightning's bar
    try:
        bar.update(3)
        missing = tmp_path / "missing.ckpt"
        assert main(["score", "--checkpoint", str(missing), "--events", str(tmp_path / "e.jsonl"),
                     "--output", str(tmp_path / "o.parquet")]) == 1
    finally:
        bar.close()
    errors = [row for row in _screen(terminal.getvalue()) if "error:" in row]
    assert len(errors) == 1 and errors[0].startswith("ksa-rec score: error: "), terminal.getvalue()


# ---- what a fit leaves: the console summary, metrics.json, everything under default_root_dir -------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short fit through the command, with a ``--trainer.default_root_dir`` of its own:
    (working directory, root dir, console output, metrics.json)."""
    work = tmp_path_factory.mktemp("fitted")
    root, console = work / "elsewhere", io.StringIO()
    with contextlib.chdir(work), contextlib.redirect_stdout(console):
        assert main(_fit(work, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root))) == 0
    return work, root, console.getvalue(), json.loads((root / "csv/version_0/metrics.json").read_text())


@pytest.mark.slow
def test_default_root_dir_holds_logs_checkpoints_and_metrics(fitted):
    work, root, _, results = fitted
    assert Path(results["checkpoint"]).is_file() and Path(results["checkpoint"]).is_relative_to(root)
    assert (root / "csv/version_0/metrics.csv").is_file() and (root / "csv/version_0/checkpoints/last.ckpt").is_file()
    assert list((root / "tensorboard/version_0").glob("events.out.tfevents.*"))
    assert not (work / "runs").exists() and not (work / "lightning_logs").exists()


@pytest.mark.slow
def test_fit_ends_with_a_headline_table(fitted):
    _, root, console, results = fitted
    assert results["val"]["targets"] == results["test"]["targets"] == 40
    rows = {line.split()[1]: line for line in console.splitlines() if re.match(r"[│|] (validation|test) ", line)}
    assert set(rows) == {"validation", "test"}
    for split, row in (("val", rows["validation"]), ("test", rows["test"])):
        for metric in ("hr@10", "ndcg@10"):
            assert f"{results[split][metric]:.4f} ± {results[split][metric + '_ci95']:.4f}" in row
    assert "HR@10" in console and "NDCG@10" in console
    assert "training: 2 epoch(s); it stopped because it reached trainer.max_epochs" in console
    assert f"every metric, per bucket, with 95% intervals: {root / 'csv/version_0/metrics.json'}" in console
    # The bucket rows (and Lightning's own table of every logged metric) stay off the console by default.
    assert "history length" not in console and "hist_" not in console and "Test metric" not in console


@pytest.mark.slow
def test_test_rescores_a_fit_checkpoint_and_prints_buckets_on_request(fitted, capsys):
    work, _, _, results = fitted
    with contextlib.chdir(work):
        assert main(["test", "--config", SMOKE, "--data.cache_dir", str(work / "cache"), "--ckpt_path",
                     results["checkpoint"], "--trainer.default_root_dir", str(work / "again"),
                     "--print_buckets", "true"]) == 0
    again = json.loads((work / "again/csv/version_0/metrics.json").read_text())
    assert again["checkpoint"] == results["checkpoint"] and "checkpoint_reason" not in again
    assert again["test"] == pytest.approx(results["test"])  # the checkpoint loads (weights-only) and scores the same
    console = capsys.readouterr().out
    lengths = [key.split("/")[0] for key in results["test"] if key.startswith("hist_") and key.endswith("/targets")]
    for bucket in lengths:
        lo, hi = bucket.split("_")[1:]
        label = f"history length >= {lo}" if hi == "plus" else f"history length [{lo}, {hi})"
        row = next(line for line in console.splitlines() if label in line)
        assert f"{int(results['test'][bucket + '/targets'])}" in row


@pytest.mark.slow
def test_test_scores_a_checkpoint_under_the_protocol_the_command_gives(fitted):
    """The checkpoint decides the model; the command decides how it is scored (model.eval). Lightning alone would
    rebuild model.eval from the checkpoint too and drop these options without a word."""
    work, _, _, results = fitted
    assert results["protocol"]["seen_items"] == "mask"  # smoke.yaml's rule, what the fit scored with
    with contextlib.chdir(work):
        assert main(["test", "--config", SMOKE, "--data.cache_dir", str(work / "cache"), "--ckpt_path",
                     results["checkpoint"], "--trainer.default_root_dir", str(work / "keep"),
                     "--model.eval.seen_items", "keep", "--model.eval.history_edges", "[10]",
                     "--model.encoder.dim", "999"]) == 0
    again = json.loads((work / "keep/csv/version_0/metrics.json").read_text())
    assert again["protocol"]["seen_items"] == "keep"
    buckets = sorted(key.split("/")[0] for key in again["test"] if key.startswith("hist_") and key.endswith("/targets"))
    assert buckets == ["hist_10_plus"]  # every smoke user has 40+ events: all in the one bucket the edge leaves
    assert again["test"]["hist_10_plus/targets"] == again["test"]["targets"] == results["test"]["targets"]
    # Model options are the checkpoint's: dim 999 would not have loaded its weights.
    saved = (work / "keep/csv/version_0/config.yaml").read_text()
    assert "dim: 999" not in saved and "seen_items: keep" in saved


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--trainer.limit_val_batches", "0"], ["--trainer.check_val_every_n_epoch", "2"]],
                         ids=["no-validation-batches", "too-short-to-validate"])
def test_metrics_say_when_no_validation_ran(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    cli = run_lightning(_fit(tmp_path, "--trainer.max_epochs", "1", *args))
    results = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert "val" not in results  # the sanity check scored the untrained model: not a validation result
    assert results["checkpoint"] is None and results["checkpoint_reason"].startswith("no validation ran")
    assert (results["fit"]["epochs"], results["fit"]["stopped_by"]) == (1, "max_epochs")
    assert "best_val" not in results["fit"] and results["test"]["targets"] == 40


# ---- --help explains every option --------------------------------------------------------------------------
def _option_help(text: str) -> dict[str, str]:
    """``--option`` -> its description in jsonargparse's help (without the "(type: ..., default: ...)" it
    adds to every option)."""
    options = {}
    for block in re.split(r"\n(?=  --)", text):
        first, *rest = block.split("\n")
        name = re.match(r"  (--[\w.]+)", first)
        if not name:
            continue
        head = re.split(r"\s{2,}", first.strip(), maxsplit=1)
        more = [line.strip() for line in rest[:next((i for i, line in enumerate(rest) if not line.startswith(" ")),
                                                    len(rest))]]
        text_ = " ".join(head[1:] + more)
        options[name.group(1)] = re.sub(r"\(type: .*\)$", "", text_).strip()
    return options


def _help(capsys, *args: str) -> dict[str, str]:
    with pytest.raises(SystemExit) as done:
        run_lightning(["fit", *args])
    assert done.value.code == 0
    return _option_help(capsys.readouterr().out)


def test_help_explains_every_option(capsys):
    import inspect
    from dataclasses import fields

    from ksa_rec.data.datamodule import RecDataModule
    from ksa_rec.data.synthetic import SyntheticConfig
    from ksa_rec.modules.config import EncoderConfig
    from ksa_rec.modules.losses import LossConfig
    from ksa_rec.modules.mka import MkaConfig
    from ksa_rec.training.module import EvalConfig, OptimConfig
    from ksa_rec.training.sharding import TorchRecStrategy

    fit = _help(capsys, "--help")
    linked = {"chunk_size", "time_gap_buckets"}  # set from model.encoder by the CLI: not options of their own
    expected = {f"--data.{name}" for name in inspect.signature(RecDataModule).parameters if name not in linked}
    expected |= {f"--model.optim.{f.name}" for f in fields(OptimConfig)}
    expected |= {f"--model.eval.{f.name}" for f in fields(EvalConfig)}
    expected |= {f"--model.loss.{f.name}" for f in fields(LossConfig)}
    expected |= {f"--model.encoder.{f.name}" for f in fields(EncoderConfig)}
    expected |= {f"--model.encoder.mka.{f.name}" for f in fields(MkaConfig)}
    synthetic = _help(capsys, "--data.synthetic.help", "SyntheticConfig")
    strategy = _help(capsys, "--trainer.strategy.help", "ksa_rec.training.sharding.TorchRecStrategy")
    shown = {**fit, **synthetic, **strategy}
    expected |= {f"--data.synthetic.{f.name}" for f in fields(SyntheticConfig)}
    expected |= {f"--trainer.strategy.{name}" for name in inspect.signature(TorchRecStrategy).parameters}
    assert expected <= shown.keys()
    assert sorted(name for name in expected if not shown[name]) == []


def test_every_etl_and_sharding_config_field_has_a_docstring():
    """Those reach the command line through RecDataModule / TorchRecStrategy; their own fields are
    documented where they are defined (read as jsonargparse reads them)."""
    from dataclasses import fields

    from docstring_parser import parse_from_object

    from ksa_rec.data.etl import EtlConfig
    from ksa_rec.training.sharding import EmbeddingOptimConfig, ShardingConfig

    for config in (EtlConfig, EmbeddingOptimConfig, ShardingConfig):
        documented = {param.arg_name: param.description for param in parse_from_object(config).params}
        assert sorted(f.name for f in fields(config) if not documented.get(f.name)) == [], config.__name__


@pytest.mark.slow
def test_a_run_resumed_from_another_directory_tests_the_best_checkpoint_it_kept(tmp_path):
    """The first run's default_root_dir is relative, so the best path its checkpoint restores is relative to the
    first run's directory; resumed elsewhere with no epoch left to train, the fit still tests that file."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    with contextlib.chdir(first):
        assert main(_fit(tmp_path, "--trainer.max_epochs", "1")) == 0
    kept = json.loads((first / "runs/csv/version_0/metrics.json").read_text())
    assert not Path(kept["checkpoint"]).is_absolute() and (first / kept["checkpoint"]).is_file()
    last = first / "runs/csv/version_0/checkpoints/last.ckpt"
    with contextlib.chdir(second):
        assert main(_fit(tmp_path, "--trainer.max_epochs", "1", "--ckpt_path", str(last))) == 0
    again = json.loads((second / "runs/csv/version_0/metrics.json").read_text())
    assert Path(again["checkpoint"]) == first / kept["checkpoint"]
    assert again["test"] == pytest.approx(kept["test"])  # the same weights, scored the same
