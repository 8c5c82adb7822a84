"""Quality study: train several (dataset, model) runs in parallel and tabulate their test metrics.

How to run (from the repository root):

    python pipelines/quality.py --study real --data-root ../shared/data --out docs/results/quality-real
    python pipelines/quality.py --study real --only beauty-full --max-time 00:00:20:00

Each run is ``ksa-rec fit --config configs/<cfg>.yaml ...`` in its own process (several share one GPU:
these models are small), logging under ``runs/<study>/<run>``. The script then writes ``<out>/results.md``
(the protocol's seen-items rule, then a markdown table: HR/NDCG@{5,10,20}, MRR with 95% CIs, seen
items, epochs, why training stopped, wall time; test metrics by history length and, on the long-range
data, by distance of the evidence) and ``<out>/results.json``. Both are rewritten as each run ends, so a
study cut short keeps its finished runs. Pass ``-- --model.eval.seen_items keep`` for data whose targets
recur (the synthetic long-range data).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    name: str
    config: str
    data_file: str | None
    """Path relative to --data-root, or None for synthetic configs."""
    overrides: list[str] = field(default_factory=list)
    seeded: bool = False
    """Repeated once per ``--seeds`` value, as ``<name>-s<seed>`` with ``--seed_everything <seed>``."""


# Hybrid-KSA on short public data: the window must be shorter than the histories for summaries to
# matter at all (KSA.md section 8: KSA only differs from full attention once n > W*k).
BEAUTY_KSA = ["--model.encoder.pattern", "ksa*3,full", "--model.encoder.chunk_size", "2", "--model.encoder.window", "4"]
ML_KSA = ["--model.encoder.pattern", "ksa*3,full", "--model.encoder.chunk_size", "8", "--model.encoder.window", "4"]

BEAUTY = "amazon-beauty/Beauty.txt"
ML1M = "ml-1m/ml-1m.txt"
BEAUTY_SPAN = ["--model.encoder.chunk_size", "2", "--model.encoder.window", "4"]
# configs/beauty.yaml as it shipped until the converged sweep of 2026-12-06 (1 head, lr 5e-4; now 2 heads,
# lr 1e-3): the studies run before it pin these, so that their commands still give their result files.
BEAUTY_1HEAD = ["--model.encoder.num_heads", "1"]
BEAUTY_OLD = [*BEAUTY_1HEAD, "--model.optim.lr", "0.0005"]
# configs/ml-1m-sasrec.yaml as it shipped for the first ML-1M sweep (dim 64, 2 heads, then dim 128 / 4 heads:
# SHIPPED_BEFORE below): ml-1m-sweep's dim-64 row and ml-1m-history pin it, so that their commands still give
# their rows.
ML1M_64 = ["--model.encoder.dim", "64", "--model.encoder.num_heads", "2"]
CHUNK = ["--model.encoder.summary_init", "chunk"]
REC = ["--model.loss.summary_reconstruction", "0.3"]
# Scoring a whole history of 2,304 events per user needs smaller evaluation batches than len 200 (the
# metrics do not depend on the batch size).
WHOLE = ["--data.max_len", "2304", "--data.eval_batch_size", "128"]
# synthetic-long-cpu.yaml's catalogue and mix, for data at other lengths (long-range-gpu-dense).
DENSE = [arg for key, value in [("num_items", 1500), ("num_categories", 12), ("num_series", 24),
                                ("episodes_per_series", 24), ("num_niche_categories", 4),
                                ("niche_items_per_category", 24), ("long_range_fraction", 0.08)]
         for arg in (f"--data.synthetic.{key}", str(value))]
LS = ["--model.loss.label_smoothing", "0.1"]
LR3 = ["--model.optim.lr", "0.001"]
MASK15 = ["--model.encoder.event_mask", "0.15"]
# Beauty: 88 steps an epoch at batch 256; cosine from lr to lr / 10 over ~90 epochs, then lr / 10.
COS = ["--model.optim.cosine_steps", "8000"]


def _cosine_head(temperature: float) -> list[str]:
    """Score items by cosine similarity at this temperature (HSTU's head: unit vectors, 0.05)."""
    return ["--model.loss.similarity", "cosine", "--model.loss.temperature", str(temperature)]


# HSTU's ML-1M loss: sampled softmax over 128 uniform negatives (shared by the batch here), no in-batch ones.
SAMPLED128 = ["--model.loss.kind", "sampled", "--model.loss.num_uniform_negatives", "128",
              "--model.loss.in_batch_negatives", "false"]


def _pattern(p: str) -> list[str]:
    return ["--model.encoder.pattern", p]


# The long-range studies before chunk-seeded summaries ran the paper's slot summaries; configs/synthetic-long-cpu
# now ships summary_init: chunk, so their commands pin slot to stay what their result files report.
SLOT = ["--model.encoder.summary_init", "slot"]


# Equal size (the dataset config's width and depth, 2 layers); only the attention kinds differ. Every
# bounded kind sees the same raw span: KSA/SCA W chunks of k, SWA W*k events, MKA/FastMKA windows of W*k
# events with blocks of k.
# Run names are the patterns (what each model computes), never "hybrid".
TWO_LAYER_KINDS = [(p, p) for p in ("full,full", "ksa,full", "ksa,ksa", "sca,sca", "swa,swa", "mka,full",
                                    "mka,mka", "fastmka,full", "fastmka,fastmka")]


def _width(dim: int, heads: int) -> list[str]:
    return ["--model.encoder.dim", str(dim), "--model.encoder.num_heads", str(heads)]


def _spans(chunk: int, window: int) -> list[str]:
    events = str(chunk * window)
    return ["--model.encoder.chunk_size", str(chunk), "--model.encoder.window", str(window),
            "--model.encoder.mka.local_window", events, "--model.encoder.mka.fast_window", events,
            "--model.encoder.mka.block_size", str(chunk)]


def _kinds(prefix: str, config: str, data_file: str | None, chunk: int, window: int, extra: list[str]) -> list[Run]:
    return [Run(f"{prefix}-{name}", config, data_file, [*_pattern(p), *_spans(chunk, window), *extra], seeded=True)
            for name, p in TWO_LAYER_KINDS]


STUDIES: dict[str, list[Run]] = {
    "real": [
        # The settings configs/beauty.yaml shipped until 2026-12-06 (dim 64, 1 head, dropout 0.5, lr 5e-4,
        # batch 256) ...
        Run("beauty-full", "beauty", BEAUTY, BEAUTY_OLD),
        Run("beauty-ksa*3,full", "beauty", BEAUTY, [*BEAUTY_OLD, *BEAUTY_KSA]),
        # ... and the wider variants tried on the way there (same data, same protocol).
        Run("beauty-full-128", "beauty", BEAUTY, ["--model.encoder.dim", "128", "--model.encoder.num_heads", "2",
                                                 "--data.batch_size", "512", "--model.optim.lr", "0.001"]),
        Run("beauty-ksa*3,full-128", "beauty", BEAUTY, [*BEAUTY_KSA, "--model.encoder.dim", "128",
                                                        "--model.encoder.num_heads", "2", "--data.batch_size", "512",
                                                        "--model.optim.lr", "0.001"]),
        Run("ml-100k-full", "ml-100k", "ml-100k/u.data"),
        Run("ml-100k-ksa*3,full", "ml-100k", "ml-100k/u.data", ML_KSA),
        Run("ml-latest-small-full", "ml-latest-small", "ml-latest-small/ratings.csv"),
        Run("ml-latest-small-ksa*3,full", "ml-latest-small", "ml-latest-small/ratings.csv", ML_KSA),
    ],
    # Every attention kind at equal size, several seeds (lr 1e-3 on Beauty: an equal, shorter budget
    # than the shipped config's 160 epochs at 5e-4).
    "beauty-kinds": _kinds("beauty", "beauty", BEAUTY, 2, 4, [*BEAUTY_1HEAD, "--model.optim.lr", "0.001"]),
    "ml-100k-kinds": _kinds("ml-100k", "ml-100k", "ml-100k/u.data", 8, 4, []),
    "ml-latest-small-kinds": _kinds("ml-latest-small", "ml-latest-small", "ml-latest-small/ratings.csv", 8, 4, []),
    # For users who have the files (none ship here): --data-root holding ml-1m/ and ml-20m/.
    "ml-1m-kinds": _kinds("ml-1m", "ml-1m", "ml-1m/ratings.dat", 8, 4, []),
    "ml-20m-kinds": _kinds("ml-20m", "ml-20m", "ml-20m/ratings.csv", 8, 4, []),
    # Equal size (dim 64, 4 layers, 4 heads); only the attention kinds differ (KSA.md section 10).
    "long-range": [
        Run(p, "synthetic-long", None, _pattern(p))
        for p in ("full*4", "ksa*3,full", "ksa*4", "sca*4", "swa*4", "mka*3,full", "fastmka*3,full")
    ],
    # The same comparison sized for a 2-core CPU (chunks of 4, window 4 chunks; evidence 30-300 back).
    "long-range-cpu": [Run(p, "synthetic-long-cpu", None, [*_pattern(p), *SLOT]) for p in
                       ("full*2", "ksa,full", "ksa*2", "sca*2", "swa*2", "mka,full", "fastmka,full")],
    # All nine kinds on the CPU-sized long-range data, several seeds (fits one GPU: pass
    # `-- --trainer.accelerator gpu`; the seed-0 CPU runs above are the same models but for MKA's block size).
    "long-range-cpu-kinds": _kinds("lr", "synthetic-long-cpu", None, 4, 4, SLOT),
    # The proposed fix for that finding: all-KSA (the same runs as lr-ksa-s* above) plus an auxiliary loss
    # asking the summaries that layer 1 reads to name their chunk's items (loss.summary_reconstruction).
    "long-range-cpu-summary-aux": [
        Run("lr-ksa-aux", "synthetic-long-cpu", None,
            [*_pattern("ksa,ksa"), *_spans(4, 4), *SLOT, "--model.loss.summary_reconstruction", "1.0"],
            seeded=True),
    ],
    # Depth: in a 2-layer stack only the second layer reads summaries that carry chunk content (at the
    # first KSA layer a summary is still its slot embedding). Four layers give three such reads.
    "long-range-cpu-depth": [Run(f"lr4-{name}", "synthetic-long-cpu", None,
                                 [*_pattern(p), *_spans(4, 4), *SLOT, *extra], seeded=True) for name, p, extra in [
        ("full", "full*4", []), ("sca", "sca*4", []), ("ksa", "ksa*4", []),
        ("ksa-aux", "ksa*4", ["--model.loss.summary_reconstruction", "1.0"]),
        ("ksa-aux0.3", "ksa*4", ["--model.loss.summary_reconstruction", "0.3"])]],
    # Summaries that carry old history at two layers (issue 15): chunk-seeded summaries (summary_init: chunk)
    # against the paper's slot-seeded ones, with and without the reconstruction loss, next to every
    # baseline at the same raw span. Names say what each model computes: <pattern>[<summary_init>, rec W].
    "long-range-cpu-summaries": [
        Run(f"lr2-{name}", "synthetic-long-cpu", None, [*_pattern(p), *_spans(4, 4), *extra], seeded=True)
        for name, p, extra in [
            ("full,full", "full,full", []), ("sca,sca", "sca,sca", []), ("swa,swa", "swa,swa", []),
            ("mka,mka", "mka,mka", []),
            ("ksa,ksa[slot]", "ksa,ksa", ["--model.encoder.summary_init", "slot"]),
            ("ksa,ksa[slot,rec0.3]", "ksa,ksa", ["--model.encoder.summary_init", "slot",
                                                 "--model.loss.summary_reconstruction", "0.3"]),
            ("ksa,ksa[chunk]", "ksa,ksa", ["--model.encoder.summary_init", "chunk"]),
            ("ksa,ksa[chunk,rec0.3]", "ksa,ksa", ["--model.encoder.summary_init", "chunk",
                                                  "--model.loss.summary_reconstruction", "0.3"]),
            ("ksa,full[chunk]", "ksa,full", ["--model.encoder.summary_init", "chunk"]),
            ("sca,full", "sca,full", []),  # ksa,full without the summary stream: its control
            ("sca,ksa[chunk]", "sca,ksa", ["--model.encoder.summary_init", "chunk"]),
            ("ksa,full[slot]", "ksa,full", ["--model.encoder.summary_init", "slot"]),
        ]],
    # The long-history recipe on real data (issue 15 study 3): ML-100K's histories (mean ~106 events, longest
    # 737) run past its raw window (8 chunks of 8), so summaries matter for its longer users.
    "ml-100k-summaries": [Run(f"ml-100k-{name}", "ml-100k", "ml-100k/u.data", [*_pattern(p), *extra], seeded=True)
                          for name, p, extra in [("full,full", "full,full", []), ("sca,sca", "sca,sca", []),
                                                 ("ksa,full[chunk]", "ksa,full",
                                                  ["--model.encoder.summary_init", "chunk"])]],
    # Issue 18 part 2: what closes the gap to the best published rows, selected on validation NDCG@10 only
    # (the seed table's "val" column; test is read only for the selected row). Beauty: the shipped config
    # (dim 64, 1 head, dropout 0.5, lr 5e-4, batch 256) and changes to it; the 2-layer KSA recipe at two of them.
    "beauty-sweep": [Run(f"beauty-{name}", "beauty", BEAUTY, [*_pattern(p), *BEAUTY_SPAN, *BEAUTY_OLD, *extra],
                         seeded=True)
                     for name, p, extra in [
                         ("full,full", "full,full", []),
                         ("full,full[ls0.1]", "full,full", LS),
                         ("full*3[ls0.1]", "full*3", LS),
                         ("ksa,full[chunk]", "ksa,full", CHUNK),
                         ("ksa,full[chunk,ls0.1]", "ksa,full", [*CHUNK, *LS]),
                         ("sca,sca", "sca,sca", [])]],  # = real-summaries' Beauty SCA row: run once
    # Issue 18 part 2 again, sized so that each run converges on a shared card (8 runs, ~100 epochs at lr 1e-3
    # in 8.5 minutes; the 27-run sweep above got 27-49): lr 1e-3 (the kinds study's converged setting) and one
    # or two changes to it, seed 0 selects on validation, then seeds 1-2 of the selected rows.
    "beauty-converged": [Run(f"beauty-{name}", "beauty", BEAUTY,
                             [*_pattern(p), *BEAUTY_SPAN, *BEAUTY_1HEAD, *LR3, *extra],
                             seeded=True)
                         for name, p, extra in [
                             ("full,full[lr1e-3]", "full,full", []),
                             ("full,full[lr1e-3,mask0.15]", "full,full", MASK15),
                             ("full,full[lr1e-3,mask0.3]", "full,full", ["--model.encoder.event_mask", "0.3"]),
                             ("full,full[lr1e-3,cos]", "full,full", COS),
                             ("full,full[lr1e-3,mask0.15,cos]", "full,full", [*MASK15, *COS]),
                             ("full,full[lr1e-3,2heads]", "full,full", ["--model.encoder.num_heads", "2"]),
                             ("ksa,full[lr1e-3,chunk]", "ksa,full", CHUNK),
                             ("ksa,full[lr1e-3,chunk,mask0.15]", "ksa,full", [*CHUNK, *MASK15]),
                             # round 2: around the row seed 0 selected (2 heads)
                             ("full,full[lr1e-3,4heads]", "full,full", ["--model.encoder.num_heads", "4"]),
                             ("ksa,full[lr1e-3,chunk,2heads]", "ksa,full",
                              [*CHUNK, "--model.encoder.num_heads", "2"])]],
    # Beauty, round 3 (seed 0 run on 2026-12-06, quality-real.md): what the converged sweep left out, one
    # change each from the shipped config (2 heads, lr 1e-3, dropout 0.5, batch 256), the shipped config itself
    # beside them in the same call.
    "beauty-converged-3": [Run(f"beauty-r3-{name}", "beauty", BEAUTY, [*_pattern(p), *BEAUTY_SPAN, *extra], seeded=True)
                           for name, p, extra in [
                               ("full,full", "full,full", []),
                               ("full,full[drop0.3]", "full,full", ["--model.encoder.dropout", "0.3"]),
                               ("full,full[drop0.4]", "full,full", ["--model.encoder.dropout", "0.4"]),
                               ("full,full[warm500]", "full,full", ["--model.optim.warmup_steps", "500"]),
                               ("full,full[batch128]", "full,full", ["--data.batch_size", "128"]),
                               ("full,full[batch512,lr2e-3]", "full,full",
                                ["--data.batch_size", "512", "--model.optim.lr", "0.002"]),
                               ("full,full[wd0.05]", "full,full", ["--model.optim.weight_decay", "0.05"]),
                               ("ksa,full[chunk]", "ksa,full", CHUNK)]],
    # ML-1M (SASRec's file, len 200): the config as first shipped (dim 64, 2 heads, dropout 0.2, lr 1e-3) and a
    # wider one (which validation selected; the config ships it now).
    "ml-1m-sweep": [Run(f"ml-1m-{name}", "ml-1m-sasrec", ML1M, [*_pattern(p), *extra], seeded=True)
                    for name, p, extra in [
                        ("full,full", "full,full", ML1M_64),
                        ("full*3-128", "full*3", _width(128, 4))]],
    # Issue 15 study 3 on ML-1M: the usual 200 most recent events against each user's whole history (longest
    # 2,277; max_len 2,304 cuts nothing), full attention and the 2-layer KSA recipes.
    "ml-1m-history": [Run(f"ml-1m-{name}", "ml-1m-sasrec", ML1M, [*_pattern(p), *ML1M_64, *extra], seeded=True)
                      for name, p, extra in [
                          ("full,full", "full,full", []),  # = ml-1m-sweep's row (len 200): run once
                          ("whole-full,full", "full,full", WHOLE),
                          ("whole-ksa,full[chunk]", "ksa,full", [*WHOLE, *CHUNK]),
                          ("whole-sca,sca", "sca,sca", WHOLE)]],
    # ML-1M to convergence (issues 18 and 15), few runs a card so that each gets the epochs it needs: the
    # shipped config (full*3, dim 128, len 200) and the same model with its first layer KSA (chunk-seeded
    # summaries) reading each user's whole history.
    "ml-1m-converged": [Run(f"ml-1m-{name}", "ml-1m-sasrec", ML1M, [*_pattern(p), *extra], seeded=True)
                        for name, p, extra in [("full*3-128", "full*3", []),
                                               ("whole-ksa,full*2[chunk]-128", "ksa,full,full", [*WHOLE, *CHUNK])]],
    # What the whole history alone gives at that size: full attention and SCA over it.
    "ml-1m-converged-whole": [Run(f"ml-1m-{name}", "ml-1m-sasrec", ML1M, [*_pattern(p), *WHOLE], seeded=True)
                              for name, p in [("whole-full*3-128", "full*3"), ("whole-sca*3-128", "sca*3")]],
    # Issue 18, the ML-1M gap: deeper and wider than the shipped full*3 at dim 128 (the goal row is HSTU with 8
    # blocks); len 200, as the protocol.
    "ml-1m-deep": [Run(f"ml-1m-{name}", "ml-1m-sasrec", ML1M, [*_pattern(p), *_width(dim, heads)], seeded=True)
                   for name, p, dim, heads in [("full*4-256", "full*4", 256, 8), ("full*6-128", "full*6", 128, 4),
                                               ("full*8-64", "full*8", 64, 2)]],
    # Issue 18: the head HSTU's and gSASRec's recipes use (cosine similarity at a low temperature), with full CE
    # and with HSTU's sampled softmax, at the shipped ML-1M size and at the deep one; and on Beauty's config.
    "ml-1m-cosine": [Run(f"ml-1m-{name}", "ml-1m-sasrec", ML1M, [*_pattern(p), *_width(dim, heads), *extra],
                         seeded=True)
                     for name, p, dim, heads, extra in [
                         ("full*3-128[cos0.05]", "full*3", 128, 4, _cosine_head(0.05)),
                         ("full*3-128[cos0.1]", "full*3", 128, 4, _cosine_head(0.1)),
                         ("full*3-128[cos0.05,sampled128]", "full*3", 128, 4, [*_cosine_head(0.05), *SAMPLED128]),
                         ("full*8-64[cos0.05]", "full*8", 64, 2, _cosine_head(0.05)),
                         ("full*8-64[cos0.05,sampled128]", "full*8", 64, 2, [*_cosine_head(0.05), *SAMPLED128])]],
    "beauty-cosine": [Run(f"beauty-{name}", "beauty", BEAUTY, [*_pattern(p), *BEAUTY_SPAN, *extra], seeded=True)
                      for name, p, extra in [("full,full[cos0.05]", "full,full", _cosine_head(0.05)),
                                             ("full,full[cos0.1]", "full,full", _cosine_head(0.1)),
                                             ("ksa,full[chunk,cos0.05]", "ksa,full", [*CHUNK, *_cosine_head(0.05)])]],
    # Issue 15 study 3 on the small sets: full, SCA and the 2-layer KSA recipe at each config's settings.
    "real-summaries": [Run(f"{data}-{name}", config, path, [*_pattern(p), *span, *extra], seeded=True)
                       for data, config, path, span in [("beauty", "beauty", BEAUTY, [*BEAUTY_SPAN, *BEAUTY_OLD]),
                                                        ("ml-100k", "ml-100k", "ml-100k/u.data", []),
                                                        ("ml-latest-small", "ml-latest-small",
                                                         "ml-latest-small/ratings.csv", [])]
                       for name, p, extra in [("full,full", "full,full", []), ("sca,sca", "sca,sca", []),
                                              ("ksa,full[chunk]", "ksa,full", CHUNK),
                                              # the n/k-state recipe of long-range.md 2j (added 2026-12-07)
                                              ("ksa,ksa[chunk,rec0.3]", "ksa,ksa", [*CHUNK, *REC])]],
    # Issue 15 study 2: long-range at thousands of events per user on the GPU (configs/synthetic-long-2l.yaml:
    # 1,500-6,000 events, evidence up to 3,000 back, raw window 32 chunks of 8 = 256 events, nothing truncated).
    "long-range-gpu": [Run(f"lrg-{name}", "synthetic-long-2l", None, [*_pattern(p), *extra], seeded=True)
                       for name, p, extra in [("full,full", "full,full", []), ("sca,sca", "sca,sca", []),
                                              ("ksa,full[chunk]", "ksa,full", CHUNK),
                                              ("ksa,ksa[chunk,rec0.3]", "ksa,ksa", [*CHUNK, *REC])]],
    # Study 2 again on a denser catalogue: configs/synthetic-long-cpu.yaml's items, series and mix (where every
    # kind learned the far-back lookup) at synthetic-long-2l's lengths (1,500-6,000 events, gaps up to 3,000).
    # In long-range-gpu no model learned the lookup: 120 series x 40 episodes among 8,000 items, each seen
    # rarely. A CPU-sized check of this study (long-range.md 2d) says the catalogue alone does not change that.
    "long-range-gpu-dense": [Run(f"lrgd-{name}", "synthetic-long-2l", None, [*_pattern(p), *DENSE, *extra],
                                 seeded=True)
                             for name, p, extra in [("full,full", "full,full", []), ("sca,sca", "sca,sca", []),
                                                    ("ksa,full[chunk]", "ksa,full", CHUNK),
                                                    # ksa,full without its summaries: is the first layer's
                                                    # locality or are the summaries what a failure comes from?
                                                    ("sca,full", "sca,full", []),
                                                    ("ksa,ksa[chunk,rec0.3]", "ksa,ksa", [*CHUNK, *REC]),
                                                    # 4 layers: the recipe of long-range.md 0b and its baselines
                                                    ("full*4", "full*4", []), ("sca*4", "sca*4", []),
                                                    ("ksa*4[chunk,rec0.3]", "ksa*4", [*CHUNK, *REC])]],
    # Issue 15 study 1 at 4 layers (CPU-sized data, as long-range-cpu-summaries at 2).
    "long-range-cpu-summaries-4l": [
        Run(f"lr4-{name}", "synthetic-long-cpu", None, [*_pattern(p), *_spans(4, 4), *extra], seeded=True)
        for name, p, extra in [
            ("full*4", "full*4", []), ("sca*4", "sca*4", []),
            ("ksa*4[chunk,rec0.3]", "ksa*4", [*CHUNK, *REC]),
            ("ksa*3,full[chunk]", "ksa*3,full", CHUNK),
            ("ksa,full,ksa,full[chunk]", "ksa,full,ksa,full", CHUNK),
        ]],
    # The rest of issue 15's grid at 4 layers (pattern x summary_init x loss), with SCA again for pairing on the
    # machine that runs it (the same run as above: one run when both studies are asked for). Sized for a CPU.
    "long-range-cpu-summaries-4l-rest": [
        Run(f"lr4-{name}", "synthetic-long-cpu", None, [*_pattern(p), *_spans(4, 4), *extra], seeded=True)
        for name, p, extra in [
            ("sca*4", "sca*4", []),
            ("ksa*4[chunk]", "ksa*4", CHUNK),
            ("ksa*4[slot]", "ksa*4", SLOT),
            ("ksa*4[slot,rec0.3]", "ksa*4", [*SLOT, *REC]),
        ]],
    # Why do summaries not carry the long-range evidence? Lossless summaries (S = k: one summary token
    # per event) separate "compression loses it" from "the model does not learn to look it up".
    "long-range-cpu-diagnostics": [
        Run("ksa-lossless", "synthetic-long-cpu", None,
            [*_pattern("ksa*2"), *SLOT, "--model.encoder.summary_tokens", "4"]),
    ],
}


# The defaults configs/ml-1m-sasrec.yaml, configs/beauty.yaml and configs/synthetic-long-cpu.yaml shipped with
# before a selection changed them (quality-real.md: for ML-1M full*8 at dim 64 / 2 heads in the 2026-12-06 night
# sweep, then dropout 0.3; for Beauty 500 warm-up steps; long-range.md 2j: the long-range CPU data's all-KSA recipe
# at 60 epochs), and the studies that ran with them: a run of theirs on that config that does not set
# a flag itself gets the old value, so that its command still gives its result file. Studies added later get the
# configs as they ship.
ML1M_128 = ["--model.encoder.dim", "128", "--model.encoder.num_heads", "4"]
SHIPPED_BEFORE = {
    "ml-1m-sasrec": [([*ML1M_128, "--model.encoder.dropout", "0.2"],
                      ["ml-1m-sweep", "ml-1m-history", "ml-1m-converged", "ml-1m-converged-whole", "ml-1m-deep",
                       "ml-1m-cosine"]),
                     (["--model.encoder.dropout", "0.2"], ["ml-1m-regularise"])],
    "synthetic-long-2l": [(["--early_stopping.patience", "4"], ["long-range-gpu", "long-range-gpu-dense"])],
    "synthetic-long-cpu": [(["--model.encoder.pattern", "ksa,full", "--model.loss.summary_reconstruction", "0",
                             "--trainer.max_epochs", "20", "--early_stopping.patience", "6",
                             "--model.encoder.summary_qkv", "own"],
                            ["long-range-cpu", "long-range-cpu-kinds", "long-range-cpu-summary-aux",
                             "long-range-cpu-depth", "long-range-cpu-summaries", "long-range-cpu-summaries-4l",
                             "long-range-cpu-summaries-4l-rest", "long-range-cpu-diagnostics"]),
                           # long-range.md 2r: then summary_qkv delta
                           (["--model.encoder.summary_qkv", "own"],
                            ["long-range-cpu-rec-weight", "long-range-cpu-near"])],
    "beauty": [(["--model.optim.warmup_steps", "0"],
                ["real", "beauty-kinds", "beauty-sweep", "beauty-converged", "beauty-converged-3", "beauty-cosine",
                 "real-summaries"])],
}
"""Per dataset config, each generation of (settings it shipped with, studies run with them)."""


def _pin(run: Run, study: str) -> Run:
    pins = next((pins for pins, studies in SHIPPED_BEFORE.get(run.config, []) if study in studies), [])
    missing = [arg for flag, value in zip(pins[::2], pins[1::2]) if flag not in run.overrides for arg in (flag, value)]
    return Run(run.name, run.config, run.data_file, [*run.overrides, *missing], run.seeded) if missing else run

# Issue 18: the cosine head on a third dataset, against the dot head, at configs/ml-100k.yaml (CPU-sized).
STUDIES["ml-100k-cosine"] = [Run(f"ml-100k-full,full{tag}", "ml-100k", "ml-100k/u.data",
                                 [*_pattern("full,full"), *extra], seeded=True)
                             for tag, extra in [("", []), ("[cos0.1]", _cosine_head(0.1))]]
# Issue 18, the ML-1M gap: regularisation and schedule around full*8 at dim 64 as shipped then (dropout 0.2, no
# warm-up), one seed each, selected on validation like the rest (dropout 0.3 won, 3 seeds: shipped since).
STUDIES["ml-1m-regularise"] = [Run(f"ml-1m-full*8-64{tag}", "ml-1m-sasrec", ML1M, extra, seeded=True)
                               for tag, extra in [("[warm500]", ["--model.optim.warmup_steps", "500"]),
                                                  ("[drop0.1]", ["--model.encoder.dropout", "0.1"]),
                                                  ("[drop0.3]", ["--model.encoder.dropout", "0.3"])]]
# Issue 18, the ML-1M gap: a cheap sequence augmentation. With the last 200 training events a user, training sees
# about 652K of ML-1M's 988K training targets; a random 200-event window a (user, epoch) (``data.train_window: random``)
# shows the rest over epochs. Evaluation reads the last 200 events either way (the protocol).
STUDIES["ml-1m-augment"] = [Run("ml-1m-full*8-64[random]", "ml-1m-sasrec", ML1M,
                                ["--data.train_window", "random"], seeded=True)]
# Issue 18, the Beauty gap: validation rose with dropout up to 0.5, the most tried (0.3 < 0.4 < 0.5, round 3);
# above it, at the shipped settings.
STUDIES["beauty-dropout"] = [Run(f"beauty-full,full[drop{d}]", "beauty", BEAUTY,
                                 [*_pattern("full,full"), "--model.encoder.dropout", d], seeded=True)
                             for d in ("0.6", "0.7")]
# Issue 18: the KSA recipe at Beauty's shipped settings (500 warm-up steps since the night sweep).
STUDIES["beauty-ksa-recipe"] = [Run("beauty-ksa,full[chunk,warm500]", "beauty", BEAUTY,
                                    [*_pattern("ksa,full"), *BEAUTY_SPAN, *CHUNK], seeded=True)]
# Issue 15, real data: the n/k-state recipe (long-range.md 2j: ksa,ksa, chunk-seeded summaries, reconstruction
# loss 0.3) beside full attention at each set's shipped settings, both in one call, so that each pair is a
# same-run comparison (the CPU ML-100K rows of real-summaries were paired with day-older full,full runs).
# (the KSA span only on the KSA rows: full attention has no window to set)
STUDIES["all-ksa-real"] = [Run(f"{data}-{name}", config, path, [*_pattern(p), *(span if extra else []), *extra],
                               seeded=True)
                           for data, config, path, span in [("beauty", "beauty", BEAUTY, BEAUTY_SPAN),
                                                            ("ml-latest-small", "ml-latest-small",
                                                             "ml-latest-small/ratings.csv", []),
                                                            ("ml-100k", "ml-100k", "ml-100k/u.data", [])]
                           for name, p, extra in [("full,full", "full,full", []),
                                                  ("ksa,ksa[chunk,rec0.3]", "ksa,ksa", [*CHUNK, *REC])]]

# Issue 15, study 1 at 2 layers: the reconstruction loss is what makes all-KSA read far back (long-range.md 2l);
# a heavier weight than the recipe's 0.3, at the recipe's budget (the shipped config: 60 epochs, patience 30).
REC1 = ["--model.loss.summary_reconstruction", "1.0"]
STUDIES["long-range-cpu-rec-weight"] = [Run("lr2-ksa,ksa[chunk,rec1.0]", "synthetic-long-cpu", None,
                                            [*_pattern("ksa,ksa"), *CHUNK, *REC1], seeded=True)]

# Issue 15, long-range.md 2o's untested reading: all-KSA is low 3-19 events back because few training targets
# need a lookup inside its raw window (evidence 30-300 back in the shipped data). The same generator with evidence
# 3-300 back (log-uniform: about 40% of it at 3-19) gives that lookup many examples; full attention and SCA on
# the same data for comparison, scored with 2o's finer distance buckets.
NO_REC = ["--model.loss.summary_reconstruction", "0"]  # the config's loss needs summaries these models do not have
NEAR = ["--data.synthetic.long_gap_min", "3", "--model.eval.distance_edges", "[3,16,20,64,150]"]
STUDIES["long-range-cpu-near"] = [Run(f"lrn-{name}", "synthetic-long-cpu", None, [*_pattern(p), *extra, *NEAR],
                                      seeded=True)
                                  for name, p, extra in [("full,full", "full,full", NO_REC),
                                                         ("sca,sca", "sca,sca", NO_REC),
                                                         ("ksa,ksa[chunk,rec0.3]", "ksa,ksa", [*CHUNK, *REC])]]

# Issue 15, long-range.md 2o/2p's reading: without a full layer, all-KSA learns two lookups (raw events in its window,
# summaries beyond it) through two sets of projections, each trained only by the targets at its distances. With
# summary_qkv: shared both streams go through the events' Q/K/V, so summary keys live in the event keys' space and
# one lookup is trained by targets at every distance. The recipe otherwise as shipped (2j), on the shipped data
# (evidence 30-300 back, scored with 2o's finer buckets) and on 2p's (evidence 3-300 back).
SHARED = ["--model.encoder.summary_qkv", "shared"]
FINE = ["--model.eval.distance_edges", "[3,16,20,64,150]"]
STUDIES["long-range-cpu-shared"] = [
    Run("lr2-ksa,ksa[chunk,rec0.3,shared]", "synthetic-long-cpu", None,
        [*_pattern("ksa,ksa"), *CHUNK, *REC, *SHARED, *FINE], seeded=True),
    Run("lrn-ksa,ksa[chunk,rec0.3,shared]", "synthetic-long-cpu", None,
        [*_pattern("ksa,ksa"), *CHUNK, *REC, *SHARED, *NEAR], seeded=True),
    # shared lifted 3-19 back to full attention's level but not 150+ (long-range.md 2q): the events' projection
    # plus a summary-only correction starting at zero, free to specialise the summary keys
    Run("lr2-ksa,ksa[chunk,rec0.3,delta]", "synthetic-long-cpu", None,
        [*_pattern("ksa,ksa"), *CHUNK, *REC, "--model.encoder.summary_qkv", "delta", *FINE], seeded=True)]

# Issue 18: LiGR layers (gated residuals and a SwiGLU feed-forward block), eSASRec's layer, in place of the plain
# pre-norm block at each dataset's shipped settings, one change at a time and both together.
LIGR = {"[gates]": ["--model.encoder.residual_gates", "true"],
        "[swiglu]": ["--model.encoder.ffn_activation", "swiglu"],
        "[ligr]": ["--model.encoder.residual_gates", "true", "--model.encoder.ffn_activation", "swiglu"]}
STUDIES["ligr"] = [Run(f"{data}-{p}{tag}", config, path, [*_pattern(p), *extra], seeded=True)
                   for data, config, path, p in [("ml-1m", "ml-1m-sasrec", ML1M, "full*8"),
                                                 ("beauty", "beauty", BEAUTY, "full,full"),
                                                 ("ml-100k", "ml-100k", "ml-100k/u.data", "full,full"),
                                                 ("ml-latest-small", "ml-latest-small", "ml-latest-small/ratings.csv",
                                                  "full,full")]
                   for tag, extra in LIGR.items()]

# Issue 18: HSTU's attention unit (pointwise SiLU attention, distance bias, U gate; ``hstu`` layers) in place of
# softmax attention at each dataset's shipped settings, and with HSTU's own loss and head on ML-1M. The sum's
# divisor is the training length, as in HSTU (200 on ML-1M, ML-100K and ML-latest-small, 50 on Beauty). ML-1M's
# shipped full*8 is a row too, for runs that share a time budget.
N50 = ["--model.encoder.hstu.normalizer", "50"]
STUDIES["hstu"] = [
    *(Run(f"ml-1m-{p}{tag}", "ml-1m-sasrec", ML1M, [*_pattern(p), *extra], seeded=True)
      for p, tag, extra in [("full*8", "", []), ("hstu*8", "", []),
                            ("hstu*8", "[drop0.2]", ["--model.encoder.dropout", "0.2"]),
                            ("hstu*8", "[sampled128,cos0.05]", [*SAMPLED128, *_cosine_head(0.05)]),
                            ("hstu*4", "", [])]),
    *(Run(f"beauty-{p}", "beauty", BEAUTY, [*_pattern(p), *N50], seeded=True) for p in ("hstu,hstu", "hstu*4")),
    *(Run(f"{name}-hstu,hstu", name, data_file, _pattern("hstu,hstu"), seeded=True)
      for name, data_file in [("ml-100k", "ml-100k/u.data"), ("ml-latest-small", "ml-latest-small/ratings.csv")])]

# Every study on the settings its result file was made with (SHIPPED_BEFORE): one pass, after every study is named.
STUDIES = {study: [_pin(r, study) for r in runs] for study, runs in STUDIES.items()}

METRICS = ["hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr"]


def open_run_log(log_root: Path, args: list[str]):
    """``log_root/stdout.log`` opened for the run's output, after a line with the date and the command. Appended,
    not replaced: a run name launched again (another seed list, a resumed study) keeps the earlier run's log."""
    out = (log_root / "stdout.log").open("a")
    out.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(args)}\n")
    out.flush()
    return out


def launch(run: Run, study: str, data_root: Path, max_time: str | None, extra: list[str],
           threads: int) -> tuple[subprocess.Popen, Path]:
    log_root = ROOT / "runs" / study / run.name
    log_root.mkdir(parents=True, exist_ok=True)
    # Each run works in its own directory (its runs/ lands there); the ETL cache is shared.
    args = [sys.executable, "-m", "ksa_rec.cli", "fit", "--config", str(ROOT / "configs" / f"{run.config}.yaml"),
            "--data.cache_dir", str(ROOT / ".cache" / "ksa_rec"), *run.overrides, *extra]
    if run.data_file:
        args += ["--data.path", str(data_root / run.data_file)]
    if max_time:
        args += ["--trainer.max_time", max_time]
    out = open_run_log(log_root, args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=log_root, env=env)
    return proc, log_root


def prepare(runs: list[Run], data_root: Path, extra: list[str]) -> None:
    """Run the ETL (and the synthetic generator) once per distinct dataset before the parallel runs,
    which then all hit the cache instead of racing to build it."""
    for config in sorted({(r.config, r.data_file) for r in runs}, key=str):
        name, data_file = config
        args = [sys.executable, "-c", "import sys; from ksa_rec.training.cli import run_lightning; "
                "run_lightning(sys.argv[1:], run=False)", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                "--data.cache_dir", str(ROOT / ".cache" / "ksa_rec"), *extra]
        if data_file:
            args += ["--data.path", str(data_root / data_file)]
        subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def expand(runs: list[Run], seeds: list[int]) -> list[Run]:
    """Seeded runs once per seed (seed-major, so a cut-short study has every run of its first seeds)."""
    out = [r for r in runs if not r.seeded]
    for seed in seeds:
        out += [Run(f"{r.name}-s{seed}", r.config, r.data_file, [*r.overrides, "--seed_everything", str(seed)])
                for r in runs if r.seeded]
    return out


def unique(runs: list[Run]) -> list[Run]:
    """Runs that several studies share (same name, same settings) run once; one name with two settings
    would write into one directory, so it stops the study."""
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen and seen[run.name] != run:
            raise SystemExit(f"quality: run {run.name} has different settings in two of the studies asked for")
        seen.setdefault(run.name, run)
    return list(seen.values())


def collect(log_root: Path) -> dict | None:
    found = sorted(log_root.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def seen_items(res: dict) -> str:
    """The seen-items rule a run was evaluated with (``model.eval.seen_items``, from its metrics.json); a
    metrics.json from before that setting had the old rule, which exempted the target from its own mask."""
    return (res.get("protocol") or {}).get("seen_items", "target exempt")


def protocol_line(results: dict[str, dict]) -> str:
    rules = sorted({seen_items(res) for res in results.values() if res.get("test")})
    if len(rules) > 1:
        return f"**Protocol:** seen items: {' / '.join(rules)} (differs between runs: see the seen items column)"
    return f"**Protocol:** seen items: {rules[0]}" if rules else ""


def table(results: dict[str, dict]) -> str:
    head = "| run | " + " | ".join(METRICS) + " | seen items | targets | epochs | stopped by | wall s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 6)]
    for name, res in results.items():
        test = res.get("test") or {}
        stop = (res.get("fit") or {}).get("stopped_by", "-")
        # a checkpoint re-tested by `ksa-rec test` (its metrics.json as the run) has no fit and no wall time
        wall = f"{res['wall_s']:.0f}" if "wall_s" in res else "-"
        if not test:
            dashes = " | ".join("-" for _ in METRICS)
            lines.append(f"| {name} | {dashes} | - | - | - | {stop} | {wall} |")
            continue
        cells = [f"{test[m]:.4f} ± {test[m + '_ci95']:.4f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seen_items(res)} | {int(test['targets'])} | "
                     f"{res.get('epochs', '-')} | {stop} | {wall} |")
    return "\n".join(lines)


# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def seed_table(results: dict[str, dict]) -> str:
    """Mean over seeds of each seeded run's test metrics, +- the 95% t half-width of that mean (the
    spread between seeds, not the per-run interval over users); beside them what model selection reads
    (the kept checkpoint's validation score), the epochs, why training stopped and its minutes."""
    groups = seed_runs(results)
    if not groups:
        return ""
    lines = ["| model (mean over seeds) | seeds | val ndcg@10 (selects) | " + " | ".join(METRICS)
             + " | epochs | stopped by | fit min |", "|" + "---|" * (len(METRICS) + 6)]
    for base, runs in groups.items():
        tests = [r["test"] for r in runs]
        cells = [ci_cell([t[m] for t in tests]) for m in METRICS]
        fits = [r.get("fit") or {} for r in runs]
        val = ci_cell([v for f in fits for v in (f.get("best_val") or {}).values()])
        epochs = "/".join(str(r.get("epochs", "-")) for r in runs)
        stops = ", ".join(sorted({f.get("stopped_by", "-") for f in fits}))
        minutes = ci_cell([f["seconds"] / 60 for f in fits if "seconds" in f], digits=1)
        lines.append(f"| {base} | {len(tests)} | {val} | " + " | ".join(cells) + f" | {epochs} | {stops} | {minutes} |")
    return "\n".join(lines)


def seed_runs(results: dict[str, dict]) -> dict[str, list[dict]]:
    """The seeded runs (``<model>-s<seed>``) that were tested, by model, in the order they appear."""
    groups: dict[str, list[dict]] = {}
    for name, res in results.items():
        base, _, seed = name.rpartition("-s")
        if base and seed.isdigit() and res.get("test"):
            groups.setdefault(base, []).append(res)
    return groups


def seed_groups(results: dict[str, dict]) -> dict[str, list[dict]]:
    """Test metrics of the seeded runs by model, in the order they appear."""
    return {base: [r["test"] for r in runs] for base, runs in seed_runs(results).items()}


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the 95% Student-t half-width of the mean (None from a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return mean, T95.get(len(values) - 1, 1.96) * sd / len(values) ** 0.5


# Group names of each family of test breakdowns (RecModule.distance_groups / history_groups).
FAMILIES = {"hist": ("hist_",), "dist": ("no_long_range", "dist_")}


def group_table(results: dict[str, dict], metric: str, family: str) -> str:
    """``metric`` per group of one family of targets (``dist``: by distance of the long-range evidence;
    ``hist``: by history length), if logged."""
    groups = group_names(results, metric, family)
    if not groups:
        return ""
    lines = [f"| run ({metric}) | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for name, res in results.items():
        test = res.get("test") or {}
        cells = [f"{test[f'{g}/{metric}']:.4f} ± {test[f'{g}/{metric}_ci95']:.4f} (n={int(test[f'{g}/targets'])})"
                 if f"{g}/{metric}" in test else "-" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_names(results: dict[str, dict], metric: str, family: str) -> list[str]:
    """Every group of one family that some run logged ``metric`` for, in the order first seen."""
    groups: list[str] = []
    for res in results.values():
        for key in res.get("test") or {}:
            group = key.split("/")[0]
            if key.endswith(f"/{metric}") and group.startswith(FAMILIES[family]) and group not in groups:
                groups.append(group)
    return groups


def paired_table(results: dict[str, dict], baseline: str, metric: str, family: str = "dist") -> str:
    """``metric`` of every seeded model minus ``baseline``'s, paired by seed, overall and in every group of
    ``family``: mean difference +- the 95% t half-width over seeds (an interval that excludes 0 is a
    difference the seeds agree on). Models are listed with the seeds they share with the baseline."""
    seeds: dict[str, dict[str, dict]] = {}
    for name, res in results.items():
        base, _, seed = name.rpartition("-s")
        if base and seed.isdigit() and res.get("test"):
            seeds.setdefault(base, {})[seed] = res["test"]
    if baseline not in seeds:
        return ""
    groups = ["all", *group_names(results, metric, family)]
    lines = [f"**Paired difference in {metric} against {baseline}** (same seeds; mean ± 95% t half-width)", "",
             "| model | seeds | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 2)]
    for model, tests in seeds.items():
        if model == baseline:
            continue
        shared = sorted(set(tests) & set(seeds[baseline]))
        cells = []
        for group in groups:
            key = metric if group == "all" else f"{group}/{metric}"
            cells.append(ci_cell([tests[s][key] - seeds[baseline][s][key] for s in shared
                                  if key in tests[s] and key in seeds[baseline][s]], signed=True))
        lines.append(f"| {model} | {len(shared)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_families(results: dict[str, dict]) -> list[str]:
    """The breakdowns a paired table is made for: each family some run logged (the overall column alone when none
    is), so that real-data pairs are also reported by history length."""
    return [f for f in FAMILIES if group_names(results, "ndcg@10", f)] or ["dist"]


def ci_cell(values: list[float], signed: bool = False, digits: int = 4) -> str:
    """A table cell: mean +- 95% t half-width of ``values`` ("-" when there are none)."""
    if not values:
        return "-"
    mean, half = mean_ci(values)
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{text} ± {half:.{digits}f}" if half is not None else text


def seed_group_table(results: dict[str, dict], metric: str, family: str) -> str:
    """``metric`` per group of ``family``, mean over each model's seeds +- the 95% t half-width."""
    groups = group_names(results, metric, family)
    models = seed_groups(results)
    if not groups or not models:
        return ""
    lines = [f"| model ({metric}, mean over seeds) | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for model, tests in models.items():
        cells = [ci_cell([t[f"{g}/{metric}"] for t in tests if f"{g}/{metric}" in t]) for g in groups]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), nargs="+", default=["real"])
    parser.add_argument("--only", nargs="*", help="run names to keep")
    # resolved: every run works in its own directory
    parser.add_argument("--data-root", type=lambda p: Path(p).resolve(), default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-time",
                        help="Lightning max_time per run, DD:HH:MM:SS (then the best checkpoint is tested)")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the seeded runs")
    parser.add_argument("--paired", nargs="*", default=[],
                        help="models (seeded run names without -s<seed>) to pair every other model against")
    parser.add_argument("--report-from", type=Path, metavar="RESULTS_JSON",
                        help="run nothing: rewrite the report of a finished study's results.json into --out "
                             "(e.g. with other --paired baselines)")
    parser.add_argument("extra", nargs="*", help="extra ksa-rec fit arguments for every run (after --)")
    args = parser.parse_args()
    if args.report_from:
        return report_again(parser, args.report_from, args.out, args.paired)
    runs = unique([r for study in args.study for r in expand(STUDIES[study], args.seeds)
                   if not args.only or r.name in args.only])
    if not runs:
        parser.error(f"no run of {args.study} is named {args.only} (seeded runs end in -s<seed>)")
    # Parallel runs share the cores: one busy-waiting OpenMP pool per process would oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // min(args.parallel, len(runs)))
    prepare(runs, args.data_root, args.extra)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    pending = list(runs)
    report = ""
    active: list[tuple[Run, subprocess.Popen, Path, float]] = []
    while pending or active:
        while pending and len(active) < args.parallel:
            run = pending.pop(0)
            proc, log_root = launch(run, "+".join(args.study), args.data_root, args.max_time, args.extra, threads)
            active.append((run, proc, log_root, time.time()))
        time.sleep(2)
        for item in list(active):
            run, proc, log_root, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            res = collect(log_root) or {}
            res["wall_s"] = time.time() - started
            res["returncode"] = proc.returncode
            res["epochs"] = (res.get("fit") or {}).get("epochs") or _epochs(log_root)
            if proc.returncode != 0:  # the reason travels with the results (the run's log may not)
                res["log_tail"] = (log_root / "stdout.log").read_text(errors="replace").splitlines()[-15:]
            results[run.name] = res
            print(f"{run.name}: exit {proc.returncode}, {res['wall_s']:.0f} s, "
                  f"test ndcg@10 {res.get('test', {}).get('ndcg@10', float('nan')):.4f}", flush=True)
            report = write_report(results, args.out, args.paired)
    print(report)
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


def report_again(parser: argparse.ArgumentParser, source: Path, out: Path, paired: list[str]) -> int:
    """The report of finished runs, written anew into ``out`` (``--report-from``)."""
    try:
        results = json.loads(source.read_text())
    except (OSError, ValueError) as err:
        parser.error(f"--report-from {source}: cannot read a results.json ({err})")
    target = out / "results.json"
    if target.exists() and target.resolve() != source.resolve():
        parser.error(f"--report-from: {target} exists and holds other results; give an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(results, out, paired))
    return 0


def write_report(results: dict[str, dict], out: Path, paired: list[str] = ()) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = "\n\n".join(filter(None, [
        protocol_line(results), seed_table(results),
        *(seed_group_table(results, "ndcg@10", f) for f in ("dist", "hist")),
        *(paired_table(results, base, "ndcg@10", f) for base in paired for f in paired_families(results)),
        table(results), *(group_table(results, m, f) for f in ("hist", "dist") for m in ("hr@10", "ndcg@10"))]))
    (out / "results.md").write_text(report + "\n")
    return report


def _epochs(log_root: Path) -> int | None:
    import csv

    files = sorted(log_root.rglob("metrics.csv"))
    if not files:
        return None
    epochs = [int(float(r["epoch"])) for r in csv.DictReader(files[-1].open()) if r.get("epoch")]
    return max(epochs) + 1 if epochs else None


if __name__ == "__main__":
    sys.exit(main())
