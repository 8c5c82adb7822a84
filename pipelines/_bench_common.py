"""What every benchmark script shares: timing, the machine, the command line, writing ``.md`` + ``.json``.

How to run: this is not a script. ``pipelines/bench_*.py`` import it (``from _bench_common import ...``;
running ``python pipelines/bench_x.py`` puts ``pipelines/`` on ``sys.path``).

Timing has two tools because two kinds of thing are timed:

- ``median_ms``: wall-clock median of whole calls after warm-up calls, synchronising the GPU after each
  call. For steps whose host work is part of the cost (a training step, a streaming update).
- ``kernel_ms``: device time of one op. On CUDA it is ``triton.testing.do_bench`` (median, L2 flushed
  between calls, ``grad_to_none`` leaves reset); elsewhere (CPU smoke runs) it is one wall-clock
  call, which only shows that the code runs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], *, warmup: int, reps: int, device: torch.device) -> float:
    """Median wall-clock ms of ``reps`` calls of ``fn`` after ``warmup`` calls (GPU synchronised per call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernel_ms(fn: Callable[[], object], *, device: torch.device, warmup_ms: float, rep_ms: float,
              grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median device ms of ``fn`` (``do_bench`` on CUDA; one wall-clock call elsewhere)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")

    def call():
        for leaf in grad_to_none or ():
            leaf.grad = None
        fn()

    return median_ms(call, warmup=0, reps=1, device=device)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory of one call of ``fn`` above what was allocated before it (CUDA only, else None)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def machine(device: torch.device) -> dict:
    """What ran the benchmark: device name and the versions that decide kernel choices."""
    info = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if device.type == "cuda":
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def machine_line(info: dict) -> str:
    extra = ", ".join(f"{key} {info[key]}" for key in ("torch", "cuda", "cudnn", "triton", "python") if info.get(key))
    return f"{info['device']} ({extra})"


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run, from the repository root."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"pipelines/{Path(script).name}", *args])


def package_commit() -> str | None:
    """Git commit of the ``ksa_rec`` checkout that was imported (None outside a git checkout): which code
    a row measured when two checkouts are run side by side."""
    import ksa_rec

    root = Path(ksa_rec.__file__).resolve().parents[1]
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10).stdout

    try:
        lines = git("rev-parse", "--show-toplevel", "--short", "HEAD").split()
        # an exported tree inside another checkout (no .git of its own) must not report the outer one's commit
        if len(lines) != 2 or Path(lines[0]).resolve() != root:
            return None
        # a tree copied over an older .git (the GPU machine's copy) or edited since: not that commit's code
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "ksa_rec").strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"{lines[1]}+uncommitted" if changed else lines[1]


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="minutes")


def header(title: str, cmd: str, info: dict, date: str) -> list[str]:
    return [f"# {title}", "", f"- command: `{cmd}`", f"- machine: {machine_line(info)}", f"- date: {date}"]


def write_outputs(prefix: Path, markdown: str, payload: dict) -> tuple[Path, Path]:
    """``prefix.md`` (the report) and ``prefix.json`` (every row as measured); folders are created."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, js = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".json")
    md.write_text(markdown)
    tmp = js.with_name(js.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(js)  # a run killed mid-write leaves the previous JSON whole
    return md, js


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")


def profile_steps(step, steps: int, device: torch.device, top: int) -> dict:
    """Where ``steps`` calls of ``step`` spend their time: wall and device-busy ms per step, kernel launches
    per step and the ``top`` kernels by device time (CUDA); off CUDA the ``top`` ops by self CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
    cpu_ops = prof.key_averages()  # aggregating the events is the slow part: once, for both uses below
    totals: dict[str, list[float]] = {}  # name -> [us, calls]
    if on_cuda:  # every kernel, memcpy and memset the steps ran on the device
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                entry = totals.setdefault(event.name, [0.0, 0])
                entry[0] += event.time_range.elapsed_us()
                entry[1] += 1
    else:
        for event in cpu_ops:
            totals[event.key] = [float(event.self_cpu_time_total), event.count]
    busy_us = sum(us for us, _ in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    # Ops that bring a tensor's value to the host (item / int / bool, nonzero and boolean-mask indexing): on
    # CUDA each waits for the device to drain, so the host cannot queue the next launches ahead of it.
    host_reads = sum(e.count for e in cpu_ops if e.key in HOST_READS)
    return {"what": "cuda kernels" if on_cuda else "cpu ops (self time)", "wall_ms": wall_ms,
            "busy_ms": busy_us / 1e3 / steps, "launches": sum(n for _, n in totals.values()) / steps,
            "host_reads": host_reads / steps,
            "top": [{"name": name, "ms": us / 1e3 / steps, "calls": n / steps,
                     "share": us / busy_us if busy_us else 0.0} for name, (us, n) in ranked]}


def _short(name: str, width: int = 90) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 3] + "..."


def top_table(title: str, profile: dict) -> list[str]:
    """Markdown lines: ``profile_steps``' top kernels (or ops) of one row, under a ``###`` heading."""
    return ["", f"### {title}: top {profile['what']}", "", "| name | ms / step | calls / step | share of busy |",
            "|---|---|---|---|",
            *[f"| `{_short(k['name'])}` | {k['ms']:.3f} | {k['calls']:.0f} | {k['share']:.0%} |"
              for k in profile["top"]]]
