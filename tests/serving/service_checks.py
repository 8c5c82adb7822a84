"""Helpers of the ``ksa-rec serve`` tests: a real redis-server, the real server as a subprocess on a free
port, and the states of any store."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ksa_rec.serving.store import open_store

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout} s")


class RedisServer:
    """``redis-server`` on a free loopback port, every write in the append-only file before it replies."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                      "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_until(up, 20, "redis-server")
        self.client = client

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Server:
    """``ksa-rec serve`` as a subprocess; ``url`` once /healthz answers."""

    def __init__(self, checkpoint, state, *extra: str, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.log = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "ksa_rec.cli", "serve", "--checkpoint", str(checkpoint),
                                      "--state", str(state), "--port", str(self.port), "--accelerator", "cpu",
                                      *extra], env=env, stdout=self.log, stderr=self.log)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ksa-rec serve exited with {self.proc.returncode}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 120, "ksa-rec serve")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def store_blobs(spec) -> dict[str, bytes]:
    store = open_store(spec, read_only=True)
    try:
        return {user: blob for rows in store.scan(1000) for user, blob in rows}
    finally:
        store.close()


def events_body(frame) -> dict:
    return {"events": frame.select("user_id", "item_id", "timestamp", "category").to_dicts()}
