"""Load test of ``ksa-rec serve``: p50/p99 latency and throughput at rising request rates, with SQLite and
with Redis, on loopback.

How to run (repository root; needs ``redis-server`` on PATH for the Redis store; ~4 minutes on 2 CPU cores):

    python pipelines/bench_serve.py --out OUT                       # trains the smoke model (configs/smoke.yaml)
    python pipelines/bench_serve.py --checkpoint CKPT --events EVENTS.parquet --stores sqlite --out OUT
    python pipelines/bench_serve.py --rates 50 100 200 --duration 5 --out OUT     # fewer, shorter steps
    python pipelines/bench_serve.py --accelerator gpu --out OUT      # the server runs the model on the GPU

For each store it starts a fresh store (a SQLite file, or its own ``redis-server`` with ``appendfsync
always``, as durable per commit as SQLite's ``synchronous=FULL``) and ``ksa-rec serve`` on a free loopback
port, warms it up, then for each rate in ``--rates`` sends ``POST /events`` open-loop: request i is due at
``i / rate`` seconds, whether or not earlier ones have been answered, at most ``--duration`` seconds and
``--max-requests`` requests per rate. Each request carries one event of one of ``--users`` users
(round-robin; items cycle through the event file; one timestamp for all, so no event is ever late and
every event is new). Latency is measured from the moment a request was due (so a client that falls behind
counts against the service), until its answer; a non-200 answer, a transport error or no answer within
``--timeout`` seconds of its due time is an error; a rate is sustained with zero errors and at least 95%
of it answered. The server's own view (``/metrics``: time from a
request's arrival to its answer, step and commit time per micro-batch, requests per micro-batch) is
reported beside it. Rates stop rising after the first rate not sustained or with a p99 over ``--give-up-ms``.

``--report RUN.json`` rewrites the table and plot of an earlier run without running anything.

Writes ``OUT/serve-load.md``, ``OUT/serve-load.json`` and ``OUT/serve-load.png`` (p50/p99 and throughput
against the offered rate, one line per store).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL_P99_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until ``check()`` holds; a ``proc`` that exits first stops the wait at once, with its log's last line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines() if log is not None and log.exists() else []
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it came up"
                               + (f": {lines[-1]}" if lines else ""))
        try:
            if check():
                return
        except (httpx.TransportError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up within {timeout:g} s")


class Processes:
    """The processes a run starts (redis-server, ksa-rec serve), stopped at the end whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.procs.clear()


def start_store(kind: str, work: Path, procs: Processes) -> str:
    if kind == "sqlite":
        for stale in work.glob("bench-states.db*"):
            stale.unlink()
        return str(work / "bench-states.db")
    import redis

    port = free_port()
    data = work / "redis"
    shutil.rmtree(data, ignore_errors=True)  # a fresh store: Redis 7 keeps its AOF in a subfolder
    data.mkdir()
    log = work / "redis.log"
    proc = procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                        "yes", "--appendfsync", "always", "--dir", str(data)], log)
    wait_for(lambda: redis.Redis(port=port).ping(), 30, "redis-server", proc, log)
    return f"redis://127.0.0.1:{port}/0"


def make_requests(events_path: Path, users: int, count: int) -> list[bytes]:
    """``count`` request bodies of one event each: user i % users, items cycling through the file."""
    import polars as pl

    frame = pl.read_parquet(events_path) if events_path.suffix == ".parquet" else pl.read_ndjson(events_path)
    items = frame["item_id"].cast(pl.String).to_list()
    feature = frame["category"].cast(pl.String).to_list() if "category" in frame.columns else None
    bodies = []
    for i in range(count):
        event = {"user_id": f"bench{i % users:05d}", "item_id": items[i % len(items)], "timestamp": 1_000_000}
        if feature is not None:
            event["category"] = feature[i % len(items)]
        bodies.append(json.dumps({"events": [event]}).encode())
    return bodies


async def run_rate(url: str, bodies: list[bytes], rate: float, timeout: float) -> dict:
    """Send ``bodies`` open-loop at ``rate`` per second; latency from each request's due time."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05

        async def one(i: int, body: bytes) -> None:
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                # The whole answer within `timeout` of the due time (httpx's own timeouts are per phase).
                response = await asyncio.wait_for(
                    http.post("/events", content=body, headers={"content-type": "application/json"}),
                    max(due + timeout - loop.time(), 0.001))
                if response.status_code == 200:
                    latencies.append(loop.time() - due)
                else:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            except (TimeoutError, httpx.TimeoutException):
                errors["timeout"] = errors.get("timeout", 0) + 1
            except httpx.TransportError as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1

        await asyncio.gather(*(one(i, body) for i, body in enumerate(bodies)))
        wall = loop.time() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"rate": rate, "requests": len(bodies), "ok": len(latencies), "errors": sum(errors.values()),
            "error_kinds": errors, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(np.max(ms)), "throughput": len(latencies) / wall, "wall_s": wall}


_STATS = {"batches": "ksa_rec_batch_requests_count", "batched_requests": "ksa_rec_batch_requests_sum",
          "step_s": "ksa_rec_step_seconds_sum", "steps": "ksa_rec_step_seconds_count",
          "commit_s": 'ksa_rec_store_seconds_sum{op="commit"}', "commits": 'ksa_rec_store_seconds_count{op="commit"}',
          "server_s": 'ksa_rec_request_seconds_sum{endpoint="events"}',
          "answered": 'ksa_rec_request_seconds_count{endpoint="events"}'}


def server_stats(url: str) -> dict[str, float]:
    """Micro-batch, step and commit totals so far, from /metrics."""
    values = dict(line.rsplit(" ", 1) for line in httpx.get(url + "/metrics").text.splitlines()
                  if line and not line.startswith("#"))
    return {key: float(values.get(name, 0)) for key, name in _STATS.items()}


def add_server_stats(row: dict, before: dict, after: dict) -> None:
    d = {k: after[k] - before[k] for k in after}
    row["mean_batch_requests"] = d["batched_requests"] / max(d["batches"], 1)
    row["mean_step_ms"] = 1000 * d["step_s"] / max(d["steps"], 1)
    row["mean_commit_ms"] = 1000 * d["commit_s"] / max(d["commits"], 1)
    row["mean_server_ms"] = 1000 * d["server_s"] / max(d["answered"], 1)


def bench_store(kind: str, args, checkpoint: Path, events: Path, procs: Processes) -> list[dict]:
    state = start_store(kind, args.out, procs)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.out / f"serve-{kind}.log"
    server = procs.start([sys.executable, "-m", "ksa_rec.cli", "serve", "--checkpoint", str(checkpoint), "--state",
                          state, "--port", str(port), "--accelerator", args.accelerator, "--step", args.step,
                          "--batch-window-ms", str(args.batch_window_ms)], log)
    wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, 180, "ksa-rec serve", server, log)
    per_rate = [min(args.max_requests, int(rate * args.duration)) for rate in args.rates]
    bodies = make_requests(events, args.users, args.warmup + sum(per_rate))
    asyncio.run(run_rate(url, bodies[:args.warmup], 20.0, args.timeout))
    rows, used = [], args.warmup
    for rate, n in zip(args.rates, per_rate):
        before = server_stats(url)
        row = asyncio.run(run_rate(url, bodies[used:used + n], rate, args.timeout))
        used += n
        add_server_stats(row, before, server_stats(url))
        row["store"] = kind
        rows.append(row)
        print(f"{kind:6s} rate {rate:6.0f}/s: ok {row['ok']}/{row['requests']}, p50 {row['p50_ms']:.1f} ms, "
              f"p99 {row['p99_ms']:.1f} ms, {row['throughput']:.0f} req/s, batch {row['mean_batch_requests']:.1f}, "
              f"step {row['mean_step_ms']:.1f} ms, commit {row['mean_commit_ms']:.1f} ms, "
              f"server {row['mean_server_ms']:.1f} ms",
              flush=True)
        if not sustained(row) or row["p99_ms"] > args.give_up_ms:
            break
    procs.stop_all()
    return rows


def sustained(row: dict) -> bool:
    """Zero errors, and answered at (nearly) the offered rate: a service that falls behind without errors
    within the run is not keeping up."""
    return row["errors"] == 0 and row["throughput"] >= 0.95 * row["rate"]


def summary(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for store in dict.fromkeys(r["store"] for r in rows):
        clean = [r for r in rows if r["store"] == store and sustained(r)]
        best = max(clean, key=lambda r: r["rate"]) if clean else None
        out[store] = {"highest_zero_error_rate": best["rate"] if best else None,
                      "p99_ms_there": best["p99_ms"] if best else None,
                      "goal_met": bool(best and best["p99_ms"] <= GOAL_P99_MS)}
    return out


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
    best = summary(rows)
    lines = [f"- {meta.get('date')}, {meta.get('machine')}; model on {meta.get('accelerator')}, step "
             f"{meta.get('step', 'jagged')}; argv: `{' '.join(meta.get('argv', []))}`", "",
             "| store | offered req/s | requests | ok | errors | p50 ms | p99 ms | max ms | answered req/s | "
             "requests / micro-batch | step ms / batch | commit ms / batch | server ms / request (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k}: {v}" for k, v in r["error_kinds"].items())
        errors = f"{r['errors']} ({kinds})" if r["errors"] else "0"
        lines.append(f"| {r['store']} | {r['rate']:g} | {r['requests']} | {r['ok']} | {errors} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['throughput']:.0f} | "
                     f"{r['mean_batch_requests']:.1f} | "
                     f"{r['mean_step_ms']:.1f} | {r['mean_commit_ms']:.1f} | {r['mean_server_ms']:.1f} |")
    lines += ["", "| store | highest rate sustained: zero errors, answered >= 95% of offered (req/s) | p99 there (ms) "
              "| p99 <= 50 ms |",
              "|---|---|---|---|"]
    for store, s in best.items():
        p99 = "-" if s["p99_ms_there"] is None else f"{s['p99_ms_there']:.1f}"
        lines.append(f"| {store} | {s['highest_zero_error_rate']} | {p99} | {'yes' if s['goal_met'] else 'no'} |")
    (out / "serve-load.md").write_text("\n".join(lines) + "\n")
    (out / "serve-load.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": best}, indent=1) + "\n")
    plot(rows, out / "serve-load.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4))
    for store in dict.fromkeys(r["store"] for r in rows):
        mine = [r for r in rows if r["store"] == store]
        rates = [r["rate"] for r in mine]
        lat.plot(rates, [r["p50_ms"] for r in mine], "o--", label=f"{store} p50")
        lat.plot(rates, [r["p99_ms"] for r in mine], "o-", label=f"{store} p99")
        thr.plot(rates, [r["throughput"] for r in mine], "o-", label=store)
    lat.axhline(GOAL_P99_MS, color="grey", lw=0.8, ls=":", label="p99 goal 50 ms")
    lat.set(xscale="log", yscale="log", xlabel="offered requests/s", ylabel="latency ms",
            title="POST /events latency (1 event per request)")
    top = max(r["rate"] for r in rows)
    thr.plot([1, top], [1, top], color="grey", lw=0.8, ls=":", label="offered")
    thr.set(xscale="log", yscale="log", xlabel="offered requests/s", ylabel="answered requests/s",
            title="throughput")
    for ax in (lat, thr):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="a ksa-rec fit checkpoint (default: train the smoke model)")
    p.add_argument("--events", type=Path, help="events whose items the requests use (default: the smoke data)")
    p.add_argument("--stores", nargs="+", choices=("sqlite", "redis"), default=["sqlite", "redis"])
    p.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40, 60, 80, 100, 150, 200, 300, 400])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of requests per rate")
    p.add_argument("--max-requests", type=int, default=5000, help="most requests per rate")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before a request counts as an error")
    p.add_argument("--give-up-ms", type=float, default=1000.0, help="stop rising once p99 exceeds this")
    p.add_argument("--batch-window-ms", type=float, default=1.0)
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="where the server runs the model")
    p.add_argument("--step", choices=("jagged", "graphed"), default="jagged",
                   help="the server's --step (graphed: CUDA graphs for one-event micro-batches; --accelerator gpu)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, help="only rewrite the table and plot of this serve-load.json")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        run = json.loads(args.report.read_text())
        write_report(run["rows"], run["meta"], args.out)
        return run["rows"]
    checkpoint, events = args.checkpoint, args.events
    if checkpoint is None:
        from compare_state_dtype import train_smoke

        checkpoint, events = train_smoke(args.out / "smoke")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
            f"{platform.python_implementation()} {platform.python_version()}", "loadavg_start": os.getloadavg(),
            "checkpoint": str(checkpoint), "argv": sys.argv[1:], "accelerator": args.accelerator,
            "step": args.step}
    if args.accelerator == "gpu":
        import torch

        meta["machine"] += f", {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    procs = Processes()
    rows = []
    try:
        for kind in args.stores:
            rows += bench_store(kind, args, checkpoint, events, procs)
    finally:
        procs.stop_all()
    meta["loadavg_end"] = os.getloadavg()
    write_report(rows, meta, args.out)
    return rows


if __name__ == "__main__":
    main()
