"""Multi-node dry run: the README's two-machine ``torchrun`` command, run as two "nodes" on this host.

How to run (repository root; CPU, gloo; about a minute on 2 cores)::

    python pipelines/multinode_dry_run.py --out OUT
    python pipelines/multinode_dry_run.py --out OUT --config configs/sharded-smoke.yaml --skip-unshared

What it does, each step a subprocess whose command, exit code and wall time go into the report:

1. **Two launchers, one rendezvous.** Two ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1
   --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT --rdzv_id ID -m ksa_rec.cli fit --config CONFIG
   --trainer.accelerator cpu --trainer.devices 1 --trainer.num_nodes 2`` start at once, in one working
   directory (on one host the two "machines" share a filesystem, as a real cluster must: see step 5).
   This is the README's "Several GPUs / machines" command with ``cpu`` for ``gpu`` and one process per node.
2. **One model.** What each rank wrote: one ``metrics.json`` and one ``meta.pt`` per checkpoint (rank 0),
   one ``__<rank>_0.distcp`` shard file per rank in every checkpoint directory, and the global step in
   ``meta.pt`` (steps per process: two processes each take half of every epoch).
3. **It loads on one process.** ``ksa-rec test --trainer.devices 1 --trainer.num_nodes 1 --ckpt_path BEST``
   reshards the 2-node checkpoint onto one process; its test metrics must equal the ones the two nodes
   wrote for the same checkpoint.
4. **It serves.** ``python -m ksa_rec.training.sharded_checkpoint BEST model.ckpt`` exports it, and
   ``ksa-rec score --checkpoint model.ckpt`` scores the run's users with the exported file.
5. **Without a shared filesystem** (``--skip-unshared`` leaves it out): the same two launchers, each in a
   working directory of its own, must both stop before training with the one-line error that names the
   checkpoint directory (``TorchRecStrategy`` probes it), instead of training with each machine keeping
   only its own shards.

Writes ``OUT/multinode_dry_run.{md,json}`` (commands, exit codes, wall times, which launcher got global
rank 0, the files each step wrote) and every launcher's stdout/stderr under ``OUT/logs/``. Exits 1 if a
check fails. ``torchrun`` is the one next to this Python (``python -m torch.distributed.run`` otherwise).

Note: with ``--rdzv_backend c10d`` torchrun assigns global ranks itself; ``--node_rank`` does not decide
which launcher's process becomes rank 0 (the report says which one did).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import command, machine, machine_line, now, package_commit, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NODES = 2
STEP_TIMEOUT_S = 300
METRICS_COMPARED = ("mrr", "hr@10", "ndcg@10", "targets")
SHARED_ERROR = "do not see the files rank 0 writes there"


@dataclass
class Step:
    name: str
    command: str
    cwd: str
    returncode: int
    wall_s: float
    log: str


def _torchrun() -> list[str]:
    launcher = Path(sys.executable).with_name("torchrun")
    return [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # The launched processes import this checkout's ksa_rec, whatever the environment's install points at.
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _start(args: list[str], cwd: Path, log: Path) -> tuple[subprocess.Popen, list]:
    log.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    handles = [open(log.with_suffix(suffix), "w") for suffix in (".out", ".err")]  # noqa: SIM115 - closed in _finish
    # A session of its own: a launcher that hangs is killed with every worker it started, and nothing else.
    process = subprocess.Popen(args, cwd=cwd, env=_env(), stdout=handles[0], stderr=handles[1],
                               start_new_session=True)
    return process, handles


def _finish(started: tuple[subprocess.Popen, list], deadline: float) -> int:
    process, handles = started
    try:
        code = process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    for handle in handles:
        handle.close()
    return code


def _run_together(name: str, commands: list[tuple[list[str], Path]], logs: Path) -> list[Step]:
    """Start every command at once (the launchers meet at the rendezvous) and wait for all of them."""
    started = time.monotonic()
    processes = [_start(args, cwd, logs / f"{name}-{i}") for i, (args, cwd) in enumerate(commands)]
    deadline = started + STEP_TIMEOUT_S
    steps = []
    for i, ((args, cwd), process) in enumerate(zip(commands, processes)):
        code = _finish(process, deadline)
        steps.append(Step(f"{name}-{i}", shlex.join(args), str(cwd), code, round(time.monotonic() - started, 1),
                          str(logs / f"{name}-{i}")))
    return steps


def _fit_commands(config: Path, port: int, rdzv_id: str, cwds: list[Path], extra: list[str]) -> list:
    return [([*_torchrun(), "--nnodes", str(NODES), "--nproc_per_node", "1", "--node_rank", str(rank),
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", rdzv_id,
              "-m", "ksa_rec.cli", "fit", "--config", str(config), "--trainer.accelerator", "cpu",
              "--trainer.devices", "1", "--trainer.num_nodes", str(NODES), *extra], cwd)
            for rank, cwd in enumerate(cwds)]


def _global_rank(log: str) -> int | None:
    """The global rank Lightning reports for the process a launcher started."""
    found = re.search(r"GLOBAL_RANK: (\d+)", Path(log).with_suffix(".out").read_text())
    return int(found.group(1)) if found else None


def _last_line(log: str, pattern: str) -> str | None:
    lines = [line for line in Path(log).with_suffix(".err").read_text().splitlines() if pattern in line]
    return lines[-1] if lines else None


def _files(root: Path) -> list[str]:
    """Every file under ``root`` but the data cache, relative to ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)


def dry_run(out: Path, config: Path, extra: list[str], unshared: bool) -> dict:
    import polars as pl
    import torch

    logs, shared = out / "logs", out / "shared"
    checks: dict[str, bool] = {}
    report: dict = {"config": str(config), "extra_options": extra}

    # 1. Two launchers in one working directory.
    fit = _run_together("fit", _fit_commands(config, _free_port(), f"dry-{os.getpid()}", [shared, shared],
                                             ["--trainer.enable_progress_bar", "false", *extra]), logs)
    ranks = [_global_rank(step.log) for step in fit]
    report["fit"] = [asdict(step) | {"global_rank": rank} for step, rank in zip(fit, ranks)]
    checks["both launchers exit 0"] = all(step.returncode == 0 for step in fit)
    checks["the launchers ran global ranks 0 and 1"] = sorted(r for r in ranks if r is not None) == [0, 1]

    # 2. What each rank wrote.
    runs = shared / "runs" / "csv"
    metrics_files = sorted(shared.rglob("metrics.json"))
    checkpoints = sorted(p for p in (runs / "version_0" / "checkpoints").glob("*.ckpt") if p.is_dir()) \
        if runs.exists() else []
    report["files"] = _files(shared)
    report["checkpoints"] = {p.name: sorted(f.name for f in p.iterdir()) for p in checkpoints}
    checks["one metrics.json"] = len(metrics_files) == 1
    checks["every checkpoint: .metadata, meta.pt and one shard file per rank"] = bool(checkpoints) and all(
        set(files) == {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"}
        for files in report["checkpoints"].values())
    if not (checks["one metrics.json"] and checkpoints):
        return report | {"checks": checks}
    fitted = json.loads(metrics_files[0].read_text())
    best = Path(fitted["checkpoint"])
    best = best if best.is_absolute() else shared / best
    meta = torch.load(best / "meta.pt", map_location="cpu", weights_only=True)
    report["best_checkpoint"] = str(best.relative_to(shared))
    report["best_epoch_global_step"] = [meta["epoch"], meta["global_step"]]
    report["fit_test_metrics"] = {k: fitted["test"][k] for k in METRICS_COMPARED}

    # 3. One process tests the 2-node checkpoint (resharded 2 -> 1 on load).
    single = shared / "single"
    test_args = [sys.executable, "-m", "ksa_rec.cli", "test", "--config", str(config), "--trainer.accelerator", "cpu",
                 "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(single), "--ckpt_path", str(best), *extra]
    (test,) = _run_together("test-one-process", [(test_args, shared)], logs)
    report["test_one_process"] = asdict(test)
    checks["1-process test exits 0"] = test.returncode == 0
    tested = next(single.rglob("metrics.json"), None)
    if tested is not None:
        one = json.loads(tested.read_text())["test"]
        report["one_process_test_metrics"] = {k: one[k] for k in METRICS_COMPARED}
        diff = max(abs(one[k] - fitted["test"][k]) for k in METRICS_COMPARED)
        report["test_metrics_max_abs_diff"] = diff
        checks["1-process test metrics equal the 2-node run's"] = diff <= 1e-9

    # 4. Export, then score with the exported file.
    exported = shared / "model.ckpt"
    (export,) = _run_together("export", [([sys.executable, "-m", "ksa_rec.training.sharded_checkpoint", str(best),
                                           str(exported)], shared)], logs)
    report["export"] = asdict(export)
    checks["export exits 0"] = export.returncode == 0 and exported.is_file()
    events = next((shared / ".cache").rglob("*.parquet"), shared / "no-synthetic-events.parquet")
    scores = shared / "top.parquet"
    (score,) = _run_together("score", [([sys.executable, "-m", "ksa_rec.cli", "score", "--checkpoint", str(exported),
                                         "--events", str(events), "--output", str(scores), "--top-k", "5",
                                         "--accelerator", "cpu"], shared)], logs)
    report["score"] = asdict(score)
    if score.returncode == 0 and scores.is_file():
        top = pl.read_parquet(scores)
        users = pl.read_parquet(events)["user_id"].n_unique()
        report["scored_users"] = [top.height, users]
        checks["score: one top-5 per user of the run's data"] = top.height == users and all(
            len(items) == 5 for items in top["item_ids"])
    else:
        checks["score: one top-5 per user of the run's data"] = False

    # 5. The same launchers without a shared filesystem: both refuse before training.
    if unshared:
        apart = [out / "unshared" / f"node{rank}" for rank in range(NODES)]
        refused = _run_together("unshared", _fit_commands(config, _free_port(), f"apart-{os.getpid()}", apart,
                                                          ["--trainer.enable_progress_bar", "false", *extra]), logs)
        lines = [_last_line(step.log, "ksa-rec fit: error:") for step in refused]
        report["unshared"] = [asdict(step) | {"error": line} for step, line in zip(refused, lines)]
        report["unshared_files"] = _files(out / "unshared")
        checks["no shared filesystem: both launchers fail with the one-line error"] = all(
            step.returncode != 0 and line is not None and SHARED_ERROR in line for step, line in zip(refused, lines))
        checks["no shared filesystem: no checkpoint written"] = not any(
            ".distcp" in name or name.endswith("meta.pt") for name in report["unshared_files"])
    return report | {"checks": checks}


def markdown(report: dict, cmd: str, info: dict, date: str, wall_s: float) -> str:
    lines = ["# Multi-node dry run: two torchrun launchers on one host", "",
             f"- command: `{cmd}`", f"- machine: {machine_line(info)}", f"- date: {date}",
             f"- code: {report.get('commit') or 'unknown'}", f"- wall time, all steps: {wall_s:.0f} s", "",
             "| step | exit | wall s | global rank | command |", "|---|---|---|---|---|"]
    for key in ("fit", "test_one_process", "export", "score", "unshared"):
        steps = report.get(key)
        for step in steps if isinstance(steps, list) else [steps] if steps else []:
            rank = step.get("global_rank", "")
            lines.append(f"| {step['name']} | {step['returncode']} | {step['wall_s']} | {'' if rank is None else rank} "
                         f"| `{step['command']}` (in `{step['cwd']}`) |")
    lines += ["", "What the two-node run wrote (one working directory):", ""]
    lines += [f"- `{name}`: {', '.join(files)}" for name, files in report.get("checkpoints", {}).items()]
    if "best_epoch_global_step" in report:
        epoch, step = report["best_epoch_global_step"]
        lines.append(f"- best checkpoint `{report['best_checkpoint']}`: epoch {epoch}, global step {step}")
    if "fit_test_metrics" in report:
        lines.append(f"- test metrics, 2-node run: {report['fit_test_metrics']}")
    if "one_process_test_metrics" in report:
        lines.append(f"- test metrics, that checkpoint on 1 process: {report['one_process_test_metrics']} "
                     f"(max difference {report['test_metrics_max_abs_diff']:.3g})")
    if "scored_users" in report:
        lines.append(f"- `ksa-rec score` with the export: {report['scored_users'][0]} rows for "
                     f"{report['scored_users'][1]} users")
    for step in report.get("unshared", []):
        lines.append(f"- {step['name']} (own working directory): exit {step['returncode']}, `{step['error']}`")
    lines += ["", "| check | passed |", "|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="working folder; the report goes here too")
    p.add_argument("--config", type=Path, default=ROOT / "configs/sharded-smoke.yaml",
                   help="a config with TorchRecStrategy (default: configs/sharded-smoke.yaml)")
    p.add_argument("--skip-unshared", action="store_true", help="leave out step 5 (separate working directories)")
    p.add_argument("extra", nargs="*", help="more ksa-rec options after --, e.g. -- --trainer.max_epochs 1")
    args = p.parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out}: must be a new or empty folder (the checks count the files the run writes)")
    config = args.config.resolve()
    if not config.is_file():
        p.error(f"--config {args.config}: file not found")
    started = time.monotonic()
    report = dry_run(out, config, args.extra, not args.skip_unshared)
    wall_s = time.monotonic() - started
    info, date = machine(__import__("torch").device("cpu")), now()
    report |= {"commit": package_commit(), "machine": info, "date": date, "wall_s": round(wall_s, 1)}
    cmd = command(__file__, argv)
    md, js = write_outputs(out / "multinode_dry_run", markdown(report, cmd, info, date, wall_s),
                           report | {"command": cmd})
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0 if report["checks"] and all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
