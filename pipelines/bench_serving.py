"""Streaming-state benchmark: state updates per second, batch-1 latency and state bytes per user.

How to run (repository root):

    python pipelines/bench_serving.py --out docs/results/serving.md            # CPU here, or the GPU if present
    python pipelines/bench_serving.py --histories 1000 10000 --batch 64 --quick
    # where a step's time goes: the 12 kernels with the most device time per batch row (issue 17's float32 miss)
    python pipelines/bench_serving.py --histories 10000 --batch 1024 --patterns 'ksa*3,full' 'ksa*4' \
        --paths fixed graphed --state-dtypes fp32 bf16 --profile 12

For each pattern (``ksa*3,full``, ``ksa*4``, ``full*4``, ``mka*3,full`` and ``fastmka*3,full``, the last
two with MKA.md's defaults; dim 64, 4 heads, k = 8, W = 32 chunks, S = 1)
and history length n, each user's per-layer cache holds exactly what the streaming state keeps after n
events (KSA.md section 7: the ring of the open chunk + W chunks and all n // k summaries for ksa layers;
all n events for full layers; the fixed-size memories of mka/fastmka layers), filled with random values
(speed does not depend on them). Timed: one ``SequenceEncoder.step`` (embedding lookup included) that appends one new
event per user, for a batch of users (updates/s = users / time) and for one user (latency); the median
of repeated runs after warm-up, each step continuing the state the one before returned (so the history
grows by one event a step, and a growable cache is timed in its steady state). State bytes per user =
the cache tensors (float32 K/V + int64 indices) versus a full KV cache (2 * n * dim * layers floats).

``--paths`` picks how a step runs (each row names its path):

- ``jagged``: ``SequenceEncoder.step`` over the jagged caches (what ``stream`` and ``serve`` run);
- ``fixed``: ``SequenceEncoder.fixed_step`` over the same rows in fixed-capacity buffers (``FixedState``, capacity
  n + 64), eagerly; only for kinds that have it (not mka / fastmka);
- ``graphed``: the same fixed step replayed from a CUDA graph (``StepGraph``; CUDA only);
- ``fixed-torch`` / ``graphed-torch``: the same with the fixed step's attention on its torch peer (a mask and two
  batched matmuls over every buffer row) instead of the default backend (on CUDA the decode kernel), for a
  same-run comparison.

``--state-dtypes bf16`` adds rows whose fixed buffers hold bf16 (the model stays float32): half the bytes a step
reads; the jagged path always computes on states cast to the model's dtype, so it has no such row.

The embedding lookup runs eagerly in every path, and is timed alone in its own column.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import command, header, machine, median_ms, now, profile_steps, top_table, write_outputs  # noqa: E402

from ksa_rec.data.schema import DataSpec  # noqa: E402
from ksa_rec.models.seqrec import SeqRecModel  # noqa: E402
from ksa_rec.modules.attention import AttentionLayer  # noqa: E402
from ksa_rec.modules.config import EncoderConfig  # noqa: E402
from ksa_rec.modules.losses import LossConfig  # noqa: E402
from ksa_rec.modules.step_graphs import StepGraph  # noqa: E402
from ksa_rec.utils.jagged import lengths_to_offsets  # noqa: E402

PATTERNS = ("ksa*3,full", "ksa*4", "full*4", "mka*3,full", "fastmka*3,full")  # named by what they compute
PATHS = ("jagged", "fixed", "graphed", "fixed-torch", "graphed-torch")
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIXED_ROOM = 64
"""Events a fixed-capacity state has room for beyond n: the capture's and the timing's steps."""


def user_cache(block, kind: str, n: int, cfg: EncoderConfig, device, dtype) -> dict[str, torch.Tensor]:
    """The rows one user's layer keeps after ``n`` events (random values; memory layers: their fixed
    buffers, sized by the config alone)."""
    k, W, H, Dh = cfg.chunk_size, cfg.window, cfg.num_heads, cfg.dim // cfg.num_heads
    if kind in ("mka", "fastmka"):
        return block.attn.empty_state(1, dtype, device).user(0)
    if kind == "full":
        idx, sidx = torch.arange(n), torch.zeros(0, dtype=torch.long)
    else:
        idx = torch.arange(max(0, (n // k - W) * k), n)
        sidx = torch.arange(n // k)
    rows = lambda m: torch.randn(m, H, Dh, dtype=dtype, device=device)  # noqa: E731
    return {"k": rows(len(idx)), "v": rows(len(idx)), "idx": idx.to(device), "sk": rows(len(sidx)),
            "sv": rows(len(sidx)), "sidx": sidx.to(device)}


def bench(pattern: str, n: int, users: int, repeats: int, device, path: str = "jagged",
          dtype=torch.float32, state_dtype=torch.float32,
          profile_top: int = 0) -> tuple[float, int, float, dict | None]:
    """-> (seconds a step, state bytes of one user, seconds of the embedding lookup alone, ``profile_steps`` of
    ``repeats`` more steps when ``profile_top``). ``state_dtype``: the fixed buffers' (fixed and graphed paths)."""
    path, _, attention = path.partition("-")
    cfg = EncoderConfig(dim=64, num_heads=4, pattern=pattern, dropout=0.0, chunk_size=8, window=32,
                        attention_backend=attention or None)
    model = SeqRecModel(cfg, LossConfig(), DataSpec(num_items=10_000)).to(device).eval()
    encoder = model.encoder
    one = [user_cache(block, kind, n, cfg, device, dtype) for block, kind in zip(encoder.blocks, cfg.layers)]
    # what a store keeps: the jagged state, its float tensors in the state dtype (``--state-dtype`` of serve)
    state_bytes = sum(t.numel() * (state_dtype.itemsize if t.is_floating_point() else t.element_size())
                      for layer in one for t in layer.values())
    ones = torch.ones(users, dtype=torch.long)
    features = KeyedJaggedTensor(keys=["item_id"], values=torch.randint(2, 10_000, (users,)), lengths=ones,
                                 offsets=lengths_to_offsets(ones)).to(device)
    offsets = lengths_to_offsets(ones).to(device)

    if path == "jagged":
        live = {"caches": encoder.stack_states([one] * users), "count": torch.full((users,), n, device=device)}

        def advance(tokens, time_part):
            # Steady state: each step continues the state the previous one returned (as a long-lived batch
            # would), so a cache that grows in place is timed appending in place, not copying on write.
            _, live["caches"] = encoder.step(tokens, offsets, live["count"], time_part, live["caches"])
            live["count"] = live["count"] + 1
    else:
        # every user the same rows: one user's state, copied to the others on the device (no jagged batch)
        one_fixed = encoder.fixed_state(encoder.stack_states([one]), torch.tensor([n]), n + FIXED_ROOM, state_dtype)

        def repeat(t):
            return None if t is None else t.expand(users, *t.shape[1:]).clone()

        fixed = replace(one_fixed, layers=[replace(c, k=repeat(c.k), v=repeat(c.v), idx=repeat(c.idx))
                                           for c in one_fixed.layers],
                        inputs=repeat(one_fixed.inputs), event_count=repeat(one_fixed.event_count))
        with torch.no_grad():
            _, time_part = model.embedding(features)
        run = (StepGraph(encoder, fixed, dtype, with_time=time_part is not None) if path == "graphed"
               else lambda tokens, time_part: encoder.fixed_step(tokens, time_part, fixed))

        def advance(tokens, time_part):
            run(tokens, time_part)

    def step():
        advance(*model.embedding(features))

    with torch.no_grad():
        ms = median_ms(step, warmup=3, reps=repeats, device=device)
        embedding_ms = median_ms(lambda: model.embedding(features), warmup=3, reps=repeats, device=device)
        profile = profile_steps(step, repeats, device, profile_top) if profile_top else None
    return ms / 1e3, state_bytes, embedding_ms / 1e3, profile


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--batch", type=int, default=256, help="users per update for the throughput column")
    p.add_argument("--max-batch-history", type=int, default=10_000,
                   help="longest history timed with the full batch (longer: batch-1 only, for memory)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    p.add_argument("--paths", nargs="+", default=["jagged"], choices=PATHS,
                   help="how a step runs (module docstring); fixed/graphed only for kinds that have them")
    p.add_argument("--state-dtypes", nargs="+", default=["fp32"], choices=list(STATE_DTYPES),
                   help="fixed buffers' dtypes (fixed/graphed paths; module docstring)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile --repeats batch steps per row (torch.profiler) and report the N kernels that "
                        "take the most device time (where does a step that misses its goal spend it?)")
    p.add_argument("--out", type=Path, default=None, help="FILE.md; FILE.json gets the rows")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if any(path.startswith("graphed") for path in args.paths) and device.type != "cuda":
        p.error("--paths graphed needs a CUDA device")
    repeats = 3 if args.quick else args.repeats
    rows, profiles = [], []
    for n in args.histories:
        for pattern in args.patterns:
            runs = [(p, s) for p in args.paths for s in (["fp32"] if p == "jagged" else args.state_dtypes)]
            for path, state in runs:
                if path != "jagged" and AttentionLayer.no_fixed_step(EncoderConfig(pattern=pattern).layers):
                    continue
                latency, state_bytes, embedding, _ = bench(pattern, n, 1, repeats, device, path,
                                                           state_dtype=STATE_DTYPES[state])
                throughput = profile = None
                if n <= args.max_batch_history:
                    batch_time, _, _, profile = bench(pattern, n, args.batch, repeats, device, path,
                                                      state_dtype=STATE_DTYPES[state], profile_top=args.profile)
                    throughput = args.batch / batch_time
                full_kv = 2 * n * 64 * 4 * 4
                label = path if state == "fp32" else f"{path}, {state} state"
                rows.append((n, pattern, label, latency, embedding, throughput, state_bytes, full_kv))
                profiles.append(profile)
                print(f"n={n:>7} {pattern:<14} {label:<8} latency {latency * 1e3:8.2f} ms (embedding "
                      f"{embedding * 1e3:.2f})  updates/s {throughput or float('nan'):10.0f}  state "
                      f"{state_bytes / 1e6:8.2f} MB (full KV {full_kv / 1e6:.2f} MB)", flush=True)
    info = machine(device)
    lines = [*header("Streaming state updates", command(__file__, argv), info, now()), "- dtype: float32", "",
             "One update = one new event per user through embedding + all layers, caches sized as a real state "
             "after n events (dim 64, 4 heads, 4 layers, k = 8, W = 32, S = 1). Paths: jagged = "
             "``SequenceEncoder.step``; fixed = ``fixed_step`` in fixed-capacity buffers, eager; graphed = the "
             "same replayed from a CUDA graph; -torch: their attention on the torch peer, not the default "
             "backend; \"bf16 state\": bf16 fixed buffers. The embedding lookup (eager in every path) is timed "
             "alone too. State bytes are the jagged state's (what a store keeps), in the row's state dtype.", "",
             f"| history n | model | path | batch-1 latency ms | of which embedding ms | updates/s (batch "
             f"{args.batch}) | state bytes/user | full KV cache bytes | full KV / state |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, name, path, latency, embedding, throughput, state_bytes, full_kv in rows:
        tput = f"{throughput:,.0f}" if throughput else "- (memory)"
        lines.append(f"| {n:,} | {name} | {path} | {latency * 1e3:.2f} | {embedding * 1e3:.2f} | {tput} | "
                     f"{state_bytes:,} | {full_kv:,} | {full_kv / state_bytes:.1f}x |")
    for (n, name, path, *_), profile in zip(rows, profiles):
        if profile:
            busy, calls = (("device busy", "launches") if profile["what"] == "cuda kernels" else
                           ("summed self CPU", "op calls"))
            lines += top_table(f"`{name}`, {path}, n = {n:,}, batch {args.batch} (wall {profile['wall_ms']:.2f} ms, "
                               f"{busy} {profile['busy_ms']:.2f} ms, {profile['launches']:.0f} {calls} a step)",
                               profile)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        rows_json = [dict(history=n, model=name, path=path, latency_ms=latency * 1e3, embedding_ms=embedding * 1e3,
                          updates_per_s=throughput, state_bytes=state_bytes, full_kv_bytes=full_kv,
                          machine=info["device"], profile=profile)
                     for (n, name, path, latency, embedding, throughput, state_bytes, full_kv), profile
                     in zip(rows, profiles)]
        write_outputs(args.out.with_suffix(""), report, rows_json)


if __name__ == "__main__":
    main()
