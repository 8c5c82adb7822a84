"""Interpretability view of a trained KSA model: for one test target whose evidence lies far back, what
the prediction reads (raw events, summaries) and what its top summaries draw on (``ksa_rec.models.explain``).

How to run (repository root), after the long-range CPU study trained its models::

    python pipelines/explain_user.py --config configs/synthetic-long-cpu.yaml \\
        --checkpoint 'runs/long-range-cpu/ksa,full' --min-distance 150 --out docs/results/explain.png

``--checkpoint`` is a ``.ckpt`` file or a run directory (its newest ``best-*.ckpt``); the model comes from
it as trained, the data from ``--config``. The first test target whose ``evidence_distance`` label is at
least ``--min-distance`` is explained; the history is cut right before that target, so "the newest event"
is the one whose state ranks it. Prints where the evidence was, the weight the prediction puts on the
summary holding it, and the top summaries (chunk, weight, the events each draws on).

``--targets N`` averages instead, over the first N such targets (below ``--max-distance`` if given; no plot): each
KSA layer's weight on all summaries, on raw events, and on the summary holding the evidence against a uniform
share, one line a layer. ``--checkpoint init``
takes the config's model untrained (what the first steps of training see). Arguments after ``--`` go to the
config (as to ``ksa-rec fit``)::

    python pipelines/explain_user.py --config configs/synthetic-long-2l.yaml --checkpoint RUN --targets 25 \
        --min-distance 20 -- --model.encoder.pattern ksa,full --model.encoder.chunk_size 4 ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.models.explain import explain_user, plot_explanation
from ksa_rec.training.cli import run_lightning
from ksa_rec.training.module import RecModule


def one_user(batch: SequenceBatch, row: int) -> SequenceBatch:
    """The user owning event ``row`` of ``batch``, its history cut after that event (a batch of B = 1)."""
    user = int(torch.searchsorted(batch.offsets, torch.tensor(row), right=True)) - 1
    start, end = int(batch.offsets[user]), row + 1
    keys = batch.features.keys()
    values = torch.cat([batch.features[key].values()[start:end] for key in keys])
    lengths = torch.full((len(keys),), end - start, dtype=torch.int64)
    return SequenceBatch(features=KeyedJaggedTensor.from_lengths_sync(keys, values, lengths),
                         offsets=torch.tensor([0, end - start]), positions=batch.positions[start:end],
                         max_len=end - start, user_index=batch.user_index[user:user + 1])


def find_target(loader, label: str, min_distance: int) -> tuple[SequenceBatch, int, int, int]:
    """First test target with ``label >= min_distance``: (its user's batch, eval row, target item, distance)."""
    for batch in loader:
        hits = (batch.labels[label] >= min_distance).nonzero().flatten()
        if hits.numel():
            i = int(hits[0])
            return batch, int(batch.eval_rows[i]), int(batch.eval_targets[i]), int(batch.labels[label][i])
    raise SystemExit(f"explain_user: no test target has {label} >= {min_distance}")


def average_reading(model, loader, label: str, min_distance: int, targets: int,
                    max_distance: int | None = None) -> list[dict[str, float]]:
    """Over the first ``targets`` test targets with ``min_distance <= label < max_distance``, what the newest
    event reads in each explained (KSA) layer: mean weight on all summaries, on raw events, and on the summary
    of the evidence's chunk (where that chunk has one) beside the mean uniform share ``1 / summaries``.
    One dict a layer, in layer order."""
    k = model.encoder_cfg.chunk_size
    layers: list[int] = []
    summaries, events, evidence, uniform = [], [], [], []  # each [target][layer row]
    for batch in loader:
        if len(summaries) == targets:
            break
        labels = batch.labels[label]
        hits = labels >= min_distance
        if max_distance is not None:
            hits &= labels < max_distance
        for i in hits.nonzero().flatten().tolist()[:targets - len(summaries)]:
            user = one_user(batch, int(batch.eval_rows[i]))
            usage = explain_user(model, user)
            layers = usage.layers
            summaries.append([float(row.sum()) for row in usage.summary_usage])
            events.append([float(row.sum()) for row in usage.event_usage])
            chunk = (int(user.positions[-1]) + 1 - int(labels[i]) - int(user.positions[0])) // k
            if 0 <= chunk < usage.summary_usage.shape[1]:
                evidence.append([float(row[chunk]) for row in usage.summary_usage])
                uniform.append(1 / usage.summary_usage.shape[1])
    n = len(summaries)
    if not n:
        raise SystemExit(f"explain_user: no test target has {min_distance} <= {label} < {max_distance}")

    def mean(rows, j):
        return sum(row[j] for row in rows) / max(len(rows), 1)

    return [{"layer": layer, "targets": n, "on_summaries": mean(summaries, j), "on_events": mean(events, j),
             "evidence_summary": mean(evidence, j), "uniform_share": sum(uniform) / max(len(uniform), 1),
             "targets_with_evidence_summary": len(evidence)} for j, layer in enumerate(layers)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="a .ckpt, a run directory, or init (untrained)")
    parser.add_argument("--label", default="evidence_distance")
    parser.add_argument("--min-distance", type=int, default=150)
    parser.add_argument("--max-distance", type=int, default=None, help="with --targets: targets below this only")
    parser.add_argument("--targets", type=int, default=None, help="average over this many targets (no plot)")
    parser.add_argument("--out", type=Path, default=Path("explain.png"))
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    cli = run_lightning(["--config", args.config, *argv[split + 1:]], run=False)
    if args.checkpoint == "init":
        model = cli.model.model
    else:
        ckpt = Path(args.checkpoint)
        if ckpt.is_dir():
            found = sorted(ckpt.rglob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise SystemExit(f"explain_user: no best-*.ckpt under {ckpt}")
            ckpt = found[-1]
        model = RecModule.load_from_checkpoint(ckpt, map_location="cpu").model
    cli.datamodule.setup("test")
    if args.targets:
        for reading in average_reading(model, cli.datamodule.test_dataloader(), args.label, args.min_distance,
                                       args.targets, args.max_distance):
            print(", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in reading.items()))
        return 0
    batch, row, target, distance = find_target(cli.datamodule.test_dataloader(), args.label, args.min_distance)
    user = one_user(batch, row)
    expl = explain_user(model, user)
    k = model.encoder_cfg.chunk_size
    first, last = int(user.positions[0]), int(user.positions[-1])
    evidence = last + 1 - distance
    print(f"user row {int(user.user_index[0])}: events {first}-{last}, target item {target}, "
          f"evidence at event {evidence} ({distance} back)")
    usage = expl.summary_usage[0]
    chunk = (evidence - first) // k
    if 0 <= chunk < usage.numel():
        rank = int((usage > usage[chunk]).sum()) + 1
        print(f"weight on the summary holding the evidence (chunk {chunk}): {float(usage[chunk]):.4f}, "
              f"rank {rank} of {usage.numel()} summaries; all summaries together: {float(usage.sum()):.3f}, "
              f"raw events: {float(expl.event_usage[0].sum()):.3f}")
    for c, weight, events in expl.top_summaries(0, 3):
        print(f"top summary, chunk {c}: weight {weight:.4f}, draws on (event, item, weight) "
              f"{[(i, item, round(w, 3)) for i, item, w in events]}")
    print(f"plot: {plot_explanation(expl, args.out, mark=evidence)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
