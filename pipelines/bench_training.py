"""Training throughput per attention pattern and history length: events/s and peak memory of a whole step.

How to run (repository root)::

    python pipelines/bench_training.py --out docs/results/raw/training-h200-DATE   # GPU: dim 64 and dim 256, 1K-64K
    python pipelines/bench_training.py --configs dim64 --lengths 1024 4096 --kinds full ksa 'ksa*3,full'
    # old code beside new, in one JSON and one report: the same (new) script, two checkouts of the package
    PYTHONPATH=/path/to/old-checkout python pipelines/bench_training.py --label old --out OUT
    PYTHONPATH=$PWD                  python pipelines/bench_training.py --label new --out OUT
    python pipelines/bench_training.py --quick --out /tmp/training                  # CPU smoke run, seconds

Configurations (``--configs``): ``dim64`` is today's model (dim 64, 4 heads of 16, 4 layers); ``dim256`` a
realistic size (dim 256, 8 heads of 32, 8 layers: HSTU-large's width and heads on ML-20M at half its
depth). Every layer kind sees the same raw span of recent events: KSA / SCA windows of W = 32 chunks of
k = 8, SWA 256 events, MKA / FastMKA local windows of 256 with blocks of 8 (MKA.md's other defaults).
Patterns are named by what they compute and repeated to the depth: ``full*4``, ``ksa*3,full``,
``ksa*4``, ``sca*4``, ``swa*4``, ``mka*3,full``, ``fastmka*3,full`` at 4 layers (``ksa*3,full,ksa*3,full``
and so on at 8).

One step = TorchRec embedding lookup, encoder forward, sampled-softmax loss (1,024 uniform negatives over
a 100K-item table, no in-batch ones: those cost tokens^2 and would hide the attention), backward and
AdamW (``build_adamw``, the optimizer ``fit`` uses: fused on CUDA), on ``--tokens`` events (65,536) split
into users of L events (every L makes the same number of next-item predictions); bf16 autocast on CUDA,
float32 on CPU. Timed: the median wall-clock step of ``--steps`` steps after ``--warmup`` (GPU synchronised
per step); peak memory: the most allocated during the warm-up and timed steps (with ``--cuda-graphs`` the capture,
in warm-up, allocates what replays reuse; reports before 2026-12-07's sixth session reset the peak after warm-up,
so their graphed peaks leave that pool out). A model that runs out of memory is a row saying so.

``--profile N`` (where a goal is missed, where does the time go?) adds, after the timed steps, ``--steps``
profiled ones (``torch.profiler``) and reports per row: device-busy ms per step against the wall ms (a step
whose device is idle most of the time is bound by the host: launches, syncs, Python), kernel launches per
step, host reads per step (ops that bring a tensor's value to the host: on CUDA each waits for the device),
and the N kernels that take the most device time (off CUDA: the N ops with the most self CPU time).

``--out PREFIX`` writes ``PREFIX.json`` and ``PREFIX.md``. Rows carry ``--label`` (and the git commit of the
imported ``ksa_rec``); a run with a new label adds its rows to an existing ``PREFIX.json`` (a run with the
same label replaces that label's rows), and the report compares every label with the first one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    command,
    header,
    machine,
    machine_line,
    median_ms,
    now,
    package_commit,
    profile_steps,
    sync,
    top_table,
    write_outputs,
)

from ksa_rec.data.batch import random_training_batch  # noqa: E402
from ksa_rec.data.schema import DataSpec  # noqa: E402
from ksa_rec.models.seqrec import SeqRecModel  # noqa: E402
from ksa_rec.modules.config import EncoderConfig  # noqa: E402
from ksa_rec.modules.losses import LossConfig  # noqa: E402
from ksa_rec.modules.mka import MkaConfig  # noqa: E402
from ksa_rec.training.module import OptimConfig  # noqa: E402

try:
    from ksa_rec.training.module import build_adamw  # noqa: E402
except ImportError:  # a package from before build_adamw (old code beside new): the optimizer its fit built
    def build_adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
        """AdamW as ``configure_optimizers`` built it before ``build_adamw``: no decay on norms and biases, fused
        on CUDA."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=next(model.parameters()).is_cuda)

CHUNK, WINDOW = 8, 32
NEGATIVES = 1024
# the unit of each pattern; units with several layers are 4 layers deep and repeat to the depth
KINDS = ("full", "ksa*3,full", "ksa", "sca", "swa", "mka*3,full", "fastmka*3,full")


@dataclass(frozen=True)
class Size:
    dim: int
    heads: int
    layers: int


CONFIGS = {"dim64": Size(64, 4, 4), "dim256": Size(256, 8, 8)}

HSTU_REFERENCE = """\
Reference, not measured here: HSTU's published training shapes (the HSTU-large configs of
facebookresearch/generative-recommenders, paper arXiv 2402.17152): ML-1M: 200 events x 128 users per step
(25,600 events), 8 blocks, 2 heads, d 50 (dqk = dv = 25), 128 sampled negatives; ML-20M: 200 x 128,
16 blocks, 8 heads, d 256 (dqk = dv = 32), 128 negatives; Amazon Books: 50 x 128, 16 blocks, 8 heads,
d 64 (dqk = dv = 8), 512 negatives. The paper's efficiency comparison runs at sequence lengths up to 8,192
(5.3-15.2x over FlashAttention2-based Transformers, BENCHMARKS.md section 4). `dim256` has ML-20M's width
and heads at half its depth; its histories (1K-64K events) are 5-330x longer than those public shapes."""


def pattern(unit: str, layers: int) -> str:
    """``"ksa"`` -> ``"ksa*8"``; ``"ksa*3,full"`` (4 layers) -> repeated to ``layers``."""
    return ",".join([unit] * (layers // 4)) if "," in unit else f"{unit}*{layers}"


def bench(size: Size, pat: str, length: int, tokens: int, warmup: int, steps: int, num_items: int,
          device: torch.device, profile_top: int = 0, compile_loss: bool = False, cuda_graphs: bool = False,
          fused_ops: str = "auto") -> dict:
    """One (configuration, pattern, L) measurement. ``fused_ops="torch"``: the norms and the sampled loss on their
    torch peers instead of the fused kernels."""
    torch.manual_seed(0)
    span = CHUNK * WINDOW
    # settings an older package lacks are passed only when asked for, so that old code beside new runs this script
    extra = ({"norm_backend": "torch"} if fused_ops == "torch" else {}) | ({"cuda_graphs": True} if cuda_graphs else {})
    cfg = EncoderConfig(dim=size.dim, num_heads=size.heads, pattern=pat, dropout=0.0, chunk_size=CHUNK, window=WINDOW,
                        mka=MkaConfig(local_window=span, fast_window=span, block_size=CHUNK), **extra)
    loss = LossConfig(kind="sampled", num_uniform_negatives=NEGATIVES, in_batch_negatives=False,
                      **({"backend": "torch"} if fused_ops == "torch" else {}))
    model = SeqRecModel(cfg, loss, DataSpec(num_items=num_items)).to(device)
    optimizer = build_adamw(model, OptimConfig(lr=1e-3))  # what fit uses: fused on CUDA
    users = max(1, tokens // length)
    batch = random_training_batch(users, length, num_items, torch.Generator().manual_seed(1)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    # --compile: what torch.compile makes of the same step (graph breaks fall back to eager; compile time
    # is spent in the warm-up steps and reported apart)
    loss_fn = torch.compile(model.loss, dynamic=False) if compile_loss else model.loss

    def step() -> None:
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # the peak spans warm-up too: with CUDA graphs the step's activations live in the graph's pool, allocated
    # while the warm-up captures and never again while it replays
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - started
    ms = median_ms(step, warmup=0, reps=steps, device=device)
    events = users * length
    row = {"users": users, "events": events, "step_ms": ms, "events_per_s": events / (ms * 1e-3), "warmup_s": warmup_s,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    if profile_top:
        row["profile"] = profile_steps(step, steps, device, profile_top)
    graphs = getattr(model.encoder, "graphs", None)
    if graphs is not None:  # what the encoder's passes were: captured, replayed, eager (and why graphs turned off)
        row["graphs"] = {"captures": graphs.captures, "replays": graphs.replays, "eager": graphs.eager,
                         "disabled": graphs.disabled}
    return row


def run(args, device: torch.device, label: str, commit: str | None, on_row=None) -> list[dict]:
    """Every (configuration, L, pattern) row; ``on_row(rows)`` after each, so that a run killed by a time limit
    (or a crash) keeps what it measured."""
    rows = []
    for name in args.configs:
        size = CONFIGS[name]
        for length in args.lengths:
            for unit in args.kinds:
                pat = pattern(unit, size.layers)
                row = {"label": label, "commit": commit, "config": name, "dim": size.dim, "heads": size.heads,
                       "layers": size.layers, "pattern": pat, "length": length, "status": "ok"}
                try:
                    row |= bench(size, pat, length, args.tokens, args.warmup, args.steps, args.num_items, device,
                                 args.profile, args.compile, args.cuda_graphs, args.fused_ops)
                except torch.OutOfMemoryError:
                    row["status"] = "out of memory"
                except Exception as err:  # noqa: BLE001 -- a compiler failure is a result of --compile, not a crash
                    if not args.compile:
                        raise
                    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
                    # a compiler subprocess's own error is the last line of the message
                    row["status"] = "compile failed: " + " ... ".join(dict.fromkeys([lines[0], lines[-1]]))[:300]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
                if on_row is not None:
                    on_row(rows)
    return rows


# ---- report --------------------------------------------------------------------------------------------

def _rate(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("events_per_s") is None:
        return r["status"]
    rate = r["events_per_s"]
    return f"{rate / 1e6:.2f} M/s" if rate >= 1e5 else f"{rate:,.0f} /s"


def config_tables(rows: list[dict], config: str, labels: list[str]) -> list[str]:
    mine = [r for r in rows if r["config"] == config]
    pats = list(dict.fromkeys(r["pattern"] for r in mine))
    lengths = list(dict.fromkeys(r["length"] for r in mine))
    first = mine[0]
    full = pattern("full", first["layers"])
    out = [f"## {config}: dim {first['dim']}, {first['heads']} heads, {first['layers']} layers", ""]

    def get(label, length, pat):
        return next((r for r in mine if r["label"] == label and r["length"] == length and r["pattern"] == pat), None)

    labels = [label for label in labels if any(r["label"] == label for r in mine)]

    for label in labels:
        out += [f"### events/s, label `{label}` (in brackets: / `{full}` at the same L, same label; for `{full}`: "
                "the step ms)", "", "| L (events per user) | " + " | ".join(f"`{p}`" for p in pats) + " |",
                "|---|" + "---|" * len(pats)]
        for length in lengths:
            base = get(label, length, full)
            cells = []
            for p in pats:
                r = get(label, length, p)
                extra = ""
                if r is not None and r.get("events_per_s"):
                    extra = (f" ({r['step_ms']:.1f} ms)" if p == full else
                             f" ({r['events_per_s'] / base['events_per_s']:.2f}x)" if base and base.get("events_per_s")
                             else "")
                cells.append(_rate(r) + extra)
            out.append(f"| {length:,} | " + " | ".join(cells) + " |")
        out += ["", f"### peak GPU memory, GiB, label `{label}`", "",
                "| L | " + " | ".join(f"`{p}`" for p in pats) + " |", "|---|" + "---|" * len(pats)]
        for length in lengths:
            peaks = [(get(label, length, p) or {}).get("peak_gib") for p in pats]
            cells = ["-" if peak is None else f"{peak:.2f}" for peak in peaks]
            out.append(f"| {length:,} | " + " | ".join(cells) + " |")
        out.append("")
    for label in labels[1:]:
        out += [f"### `{label}` / `{labels[0]}`: events/s ratio (same configuration, pattern and L)", "",
                "| L | " + " | ".join(f"`{p}`" for p in pats) + " |", "|---|" + "---|" * len(pats)]
        for length in lengths:
            cells = []
            for p in pats:
                new, old = get(label, length, p), get(labels[0], length, p)
                ok = new and old and new.get("events_per_s") and old.get("events_per_s")
                cells.append(f"{new['events_per_s'] / old['events_per_s']:.2f}x" if ok else "-")
            out.append(f"| {length:,} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def markdown(payload: dict) -> str:
    rows, runs = payload["rows"], payload["runs"]
    labels = list(runs)
    last = runs[labels[-1]]
    lines = header("Training throughput by attention pattern and history length", last["command"],
                   last["machine"], last["date"])
    for label, run_info in runs.items():
        compiled = " (`--compile`: the loss under torch.compile)" if run_info.get("compile") else ""
        lines.append(f"- label `{label}`{compiled}: ksa_rec commit {run_info['commit'] or 'unknown'}; "
                     f"`{run_info['command']}` on {machine_line(run_info['machine'])}, {run_info['date']}")
    lines += [f"- one step: embedding lookup, encoder, sampled softmax ({NEGATIVES} uniform negatives), backward, "
              f"AdamW; {last['tokens']:,} events per step split into users of L events; k = {CHUNK}, "
              f"W = {WINDOW} chunks (a raw span of {CHUNK * WINDOW} events for every bounded kind); median of "
              f"{last['steps']} steps after {last['warmup']}", "", HSTU_REFERENCE, ""]
    for config in dict.fromkeys(r["config"] for r in rows):
        lines += config_tables(rows, config, labels)
    lines += profile_tables(rows)
    return "\n".join(lines) + "\n"


def profile_tables(rows: list[dict]) -> list[str]:
    """``--profile``: one summary table (busy vs wall, launches) and each row's top kernels."""
    profiled = [r for r in rows if r.get("profile")]
    if not profiled:
        return []
    what = profiled[0]["profile"]["what"]
    on_cuda = what == "cuda kernels"
    busy, count = ("device busy", "launches") if on_cuda else ("self CPU", "op calls")
    note = ("device busy = the summed time of the CUDA kernels, copies and sets (one stream, so busy < wall "
            "means the device waited for the host)" if on_cuda else
            "off CUDA: the summed self CPU time of every op, and every op call (nested ones too)")
    out = ["## Where the time goes (`--profile`)", "", f"Profiled steps after the timed ones; {note}. Host reads = "
           "ops that bring a tensor's value to the host (`aten::_local_scalar_dense`: item / int / bool; "
           "`aten::nonzero`: boolean-mask indexing); on CUDA each waits for the device to drain.", "",
           f"| label | config | pattern | L | wall ms / step | {busy} ms / step | {busy} / wall | {count} / step "
           "| host reads / step |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in profiled:
        p = r["profile"]
        reads = p.get("host_reads")  # absent in rows written before it was counted
        out.append(f"| {r['label']} | {r['config']} | `{r['pattern']}` | {r['length']:,} | {p['wall_ms']:.2f} | "
                   f"{p['busy_ms']:.2f} | {p['busy_ms'] / p['wall_ms']:.0%} | {p['launches']:.0f} | "
                   f"{'-' if reads is None else f'{reads:.0f}'} |")
    for r in profiled:
        out += top_table(f"`{r['pattern']}`, {r['config']}, L = {r['length']:,}, label `{r['label']}`", r["profile"])
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="pattern units, repeated to each configuration's depth")
    parser.add_argument("--tokens", type=int, default=65_536, help="events per step")
    parser.add_argument("--num-items", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--label", default="this", help="names this run's rows (old code beside new)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="model.encoder.cuda_graphs: the encoder's pass replayed from a CUDA graph (captured at "
                             "the second warm-up step: needs --warmup >= 2)")
    parser.add_argument("--fused-ops", choices=["auto", "torch"], default="auto",
                        help="torch: the RMSNorms and the sampled loss on their torch peers (label it so)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model's loss (forward; backward through AOTAutograd): label it so")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile --steps steps per row and report its N most expensive kernels")
    parser.add_argument("--quick", action="store_true", help="smoke run: L = 64, 128; 256 events per step; 1 step")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md (rows of other labels are kept)")
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(lengths=[64, 128], tokens=256, warmup=1, steps=1, num_items=1000)
        args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    commit = package_commit()
    run_info = {"command": command(__file__, argv), "machine": machine(device), "date": now(), "commit": commit,
                "tokens": args.tokens, "warmup": args.warmup, "steps": args.steps, "compile": args.compile,
                "cuda_graphs": args.cuda_graphs, "fused_ops": args.fused_ops}
    payload = {"runs": {}, "rows": []}
    if args.out is not None and (path := args.out.with_name(args.out.name + ".json")).exists():
        payload = json.loads(path.read_text())  # keep the other labels' rows
        others = {k: v for k, v in payload["runs"].items() if k != args.label}
        if any(v["tokens"] != args.tokens for v in others.values()):
            parser.error(f"{path} holds runs with another --tokens: labels are compared at the same step size")
    others = [r for r in payload["rows"] if r["label"] != args.label]
    payload["runs"] = {**{k: v for k, v in payload["runs"].items() if k != args.label}, args.label: run_info}

    def write(rows: list[dict]) -> tuple[Path, Path] | None:
        payload["rows"] = others + rows
        return None if args.out is None else write_outputs(args.out, markdown(payload), payload)

    rows = run(args, device, args.label, commit, on_row=write)
    written = write(rows)
    if written is None:
        print(markdown(payload))
    else:
        print(f"report: {written[0]}, rows: {written[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
