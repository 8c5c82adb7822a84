"""Checkpoints are untrusted input: every command reads them from local files only and weights-only, and
every unusable one (code inside, empty, built for another model) is refused in one line."""

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ksa_rec.cli import main
from ksa_rec.training.cli import run_lightning

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/smoke.yaml")


class Payload:
    """Unpickled, it creates the file ``marker``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def payload(tmp_path):
    """(a checkpoint that runs a payload when unpickled, the file the payload creates)."""
    marker, path = tmp_path / "PAYLOAD_RAN", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": Payload(marker)}}, path)
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    return path, marker


@pytest.fixture
def served(payload):
    """The payload checkpoint served over HTTP from a local thread: (url, marker, requests received)."""
    path, marker = payload
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(path.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{path.name}", marker, requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def events(tmp_path) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"user_id": "u1", "item_id": "i000001", "timestamp": 1000 + t,
                                        "category": "c01"}) + "\n" for t in range(3)))
    return path


def _command(command: str, checkpoint: str, tmp_path: Path, events: Path) -> list[str]:
    """``command`` run on ``checkpoint``; for fit, validate and test the smoke config's data."""
    if command == "score":
        return ["score", "--checkpoint", checkpoint, "--events", str(events), "--output", str(tmp_path / "o.parquet")]
    if command == "stream":
        return ["stream", "--checkpoint", checkpoint, "--events", str(events), "--state", str(tmp_path / "s.db")]
    return [command, "--config", SMOKE, "--data.cache_dir", str(tmp_path / "cache"), "--ckpt_path", checkpoint]


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"ksa-rec {command}: error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("command", ["test", "validate", "fit", "score", "stream"])
def test_a_checkpoint_url_is_refused_without_fetching_it(served, tmp_path, monkeypatch, capsys, events, command):
    url, marker, requests = served
    monkeypatch.chdir(tmp_path)
    assert main(_command(command, url, tmp_path, events)) == 1
    assert f"{url}: checkpoints are read from local files only" in _one_error_line(capsys, command)
    assert not marker.exists() and requests == []


def test_any_url_scheme_is_refused(tmp_path, monkeypatch, capsys, events):
    monkeypatch.chdir(tmp_path)
    assert main(_command("fit", "s3://bucket/run/last.ckpt", tmp_path, events)) == 1
    assert "s3://bucket/run/last.ckpt: checkpoints are read from local files only" in _one_error_line(capsys, "fit")


@pytest.mark.parametrize("command", ["test", "score", "stream"])
def test_a_checkpoint_that_would_run_code_is_refused(payload, tmp_path, monkeypatch, capsys, events, command):
    path, marker = payload
    monkeypatch.chdir(tmp_path)
    assert main(_command(command, str(path), tmp_path, events)) == 1
    line = _one_error_line(capsys, command)
    assert f"{path}: refused: it holds more than tensors and plain data" in line and "Unsupported global" in line
    assert not marker.exists()


@pytest.mark.parametrize("command", ["test", "score", "stream"])
def test_an_empty_checkpoint_is_one_line(tmp_path, monkeypatch, capsys, events, command):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert main(_command(command, str(path), tmp_path, events)) == 1
    assert _one_error_line(capsys, command).endswith(f"{path}: not a readable checkpoint (an empty file)")


@pytest.fixture(scope="module")
def incompatible(tmp_path_factory) -> tuple[Path, str]:
    """A fit checkpoint with one weight renamed (one missing and one unexpected key for the model it
    describes), and the weight's real name."""
    work = tmp_path_factory.mktemp("incompatible")
    run_lightning(["fit", "--config", SMOKE, "--trainer.max_epochs", "1", "--trainer.logger", "false",
                   "--trainer.default_root_dir", str(work), "--data.cache_dir", str(work / "cache")])
    checkpoint = torch.load(next(work.rglob("last.ckpt")), weights_only=True)
    renamed = min(checkpoint["state_dict"])
    checkpoint["state_dict"]["model.renamed.weight"] = checkpoint["state_dict"].pop(renamed)
    path = work / "incompatible.ckpt"
    torch.save(checkpoint, path)
    return path, renamed


@pytest.mark.slow
@pytest.mark.parametrize("command", ["test", "score", "stream"])
def test_an_incompatible_checkpoint_names_the_keys(incompatible, tmp_path, monkeypatch, capsys, events, command):
    path, renamed = incompatible
    monkeypatch.chdir(tmp_path)
    assert main(_command(command, str(path), tmp_path, events)) == 1
    line = _one_error_line(capsys, command)
    assert f"{path}: incompatible checkpoint" in line
    assert f"missing {renamed}" in line and "unexpected model.renamed.weight" in line
