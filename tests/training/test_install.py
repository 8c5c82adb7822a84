"""``make venv`` installs the CPU torch wheel first: from TORCH_INDEX (PyTorch's CPU index) when it answers,
else from pip's configured index. Run against a stub ``pip`` that records what it is asked to install."""

import functools
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make (the documented installer)")


@pytest.fixture
def stub_bin(tmp_path) -> Path:
    """A venv ``bin`` whose python is this one and whose pip appends its arguments to ``pip.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    pip = bin_dir / "pip"
    pip.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "pip.log"}\n')
    pip.chmod(0o755)
    return bin_dir


def _install_torch(bin_dir: Path, index: str) -> tuple[str, list[str]]:
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "torch-cpu", f"BIN={bin_dir}", f"TORCH_INDEX={index}"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode == 0, done.stderr
    return done.stdout, (bin_dir.parent / "pip.log").read_text().splitlines()


def test_torch_comes_from_the_cpu_index_when_it_answers(stub_bin, tmp_path):
    (tmp_path / "index/torch").mkdir(parents=True)
    (tmp_path / "index/torch/index.html").write_text("<html></html>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler,
                                                                     directory=str(tmp_path / "index")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}"
        out, pip = _install_torch(stub_bin, index)
    finally:
        server.shutdown()
        server.server_close()
    assert pip == [f"install -q --index-url {index} torch==2.13.0"]
    assert f"CPU build, from {index}" in out


def test_torch_falls_back_to_the_configured_index_when_the_cpu_index_cannot_be_reached(stub_bin):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        index = f"http://127.0.0.1:{probe.getsockname()[1]}"
    out, pip = _install_torch(stub_bin, index)
    assert pip == ["install -q torch==2.13.0"]
    assert f"TORCH_INDEX ({index}) cannot be reached" in out
