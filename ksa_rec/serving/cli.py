"""``ksa-rec score`` and ``ksa-rec stream`` (command-line contract of ARCHITECTURE.md)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, like every other ksa-rec error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def score_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ksa-rec score", description="Top-K per user from full histories (an event file) or "
                "from a state store, written to parquet (user_id, event_count, item_ids, scores).")
    p.add_argument("--checkpoint", required=True, help="a ksa-rec fit checkpoint (.ckpt)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--events", help="event file (parquet/csv/jsonl: user_id, item_id, timestamp[, features])")
    source.add_argument("--state", help="state store (SQLite) written by ksa-rec stream; opened read-only")
    p.add_argument("--output", required=True, type=Path, help="output .parquet")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--top-k", type=positive_int, default=10)
    _add_seen_items(p)
    p.add_argument("--batch-size", type=positive_int, default=256, help="users per batch")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="score from the newest MAX_LEN events (whole chunks); default: whole histories")
    p.add_argument("--item-chunk", type=positive_int, default=65536, help="items scored at once (bounds memory)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    p.add_argument("--devices", type=positive_int, default=1,
                   help="processes (one per GPU); users are split between them and the parts merged")
    _add_backend_option(p)
    return p


def stream_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ksa-rec stream", description="Apply events in order to persistent per-user states and "
                "emit fresh top-K for touched users; exactly-once by event identity (re-running on the same "
                "or a longer input applies only what is new). See docs/reliability.md.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--events", required=True, help="event file (parquet/csv/jsonl) or - for JSON lines on stdin")
    p.add_argument("--state", required=True, type=Path,
                   help="state store (SQLite file; created if missing; one writer at a time)")
    p.add_argument("--output", type=Path, default=None,
                   help="sink: .jsonl file or a parquet parts directory (default: <state>.outputs.jsonl)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output that this state store did not write")
    p.add_argument("--top-k", type=positive_int, default=10)
    _add_seen_items(p)
    p.add_argument("--chunk-rows", type=positive_int, default=4096, help="events per micro-batch (one commit each)")
    p.add_argument("--item-chunk", type=positive_int, default=65536)
    p.add_argument("--on-bad-event", choices=("error", "skip", "dead-letter"), default="error",
                   help="a malformed or late event: stop with one line (error), count it and go on (skip), or "
                        "also append it to --dead-letter")
    p.add_argument("--dead-letter", type=Path, default=None,
                   help="JSON lines file for rejected events (file, row, column, kind, reason, raw)")
    p.add_argument("--on-unknown-item", choices=("oov", "skip", "error"), default="oov",
                   help="an item id the checkpoint does not know: apply it as out-of-vocabulary (oov), count "
                        "it and leave it out (skip), or stop (error)")
    p.add_argument("--summary", type=Path, default=None, help="also write the run's counts to this JSON file")
    p.add_argument("--accelerator", default="auto")
    _add_backend_option(p)
    return p


def _add_seen_items(p: argparse.ArgumentParser) -> None:
    """The seen-items setting of evaluation (``model.eval.seen_items``), for recommendations."""
    from ksa_rec.models.ranking import SEEN_ITEMS

    p.add_argument("--seen-items", choices=SEEN_ITEMS, default="mask",
                   help="items the user interacted with: mask (never recommended; default) or keep (ranked "
                        "with the rest: repeat-aware)")
    p.add_argument("--include-seen", dest="seen_items", action="store_const", const="keep",
                   help="same as --seen-items keep (its older name; the last of the two flags wins)")


def _add_backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model.encoder.attention_backend", dest="attention_backend", default=None,
                   choices=["auto", "torch", "flex", "triton"],
                   help="attention backend of the model's step (default: the checkpoint's setting)")


def _engine(args):
    import torch

    from ksa_rec.serving.artifact import ServingModel
    from ksa_rec.serving.engine import StreamEngine

    use_gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    overrides = None
    if args.attention_backend is not None:
        overrides = {"attention_backend": None if args.attention_backend == "auto" else args.attention_backend}
    # Each process of ``score --devices N`` onto its own GPU (Lightning gives local rank r cuda:r): on plain
    # "cuda" every process would first load the model onto GPU 0 and keep a CUDA context there for the run.
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if use_gpu else "cpu"
    serving = ServingModel.load(args.checkpoint, device, overrides)
    return StreamEngine(serving, top_k=args.top_k, exclude_seen=args.seen_items == "mask", item_chunk=args.item_chunk)


def score(argv: list[str]) -> None:
    from ksa_rec.serving.jobs import run_score
    from ksa_rec.serving.store import SqliteStateStore

    args = score_parser().parse_args(argv)
    engine = _engine(args)
    store = SqliteStateStore(args.state, read_only=True) if args.state else None
    try:
        summary = run_score(engine, args.output, events=args.events, store=store, batch_size=args.batch_size,
                            max_len=args.max_len, accelerator=args.accelerator, devices=args.devices,
                            overwrite=args.overwrite)
    finally:
        if store is not None:
            store.close()
    if summary is not None:  # rank 0; the other processes of --devices N print nothing
        print(f"ksa-rec score: top-{args.top_k} per user written to {args.output} ({summary.users:,} users; "
              f"scored in {summary.score_s:.2f} s on {summary.processes} process(es): "
              f"{summary.users / max(summary.score_s, 1e-9):,.0f} users/s; input read in {summary.prepare_s:.2f} s)")


def stream(argv: list[str]) -> None:
    from ksa_rec.serving.admission import AdmissionConfig
    from ksa_rec.serving.jobs import run_stream
    from ksa_rec.serving.store import SqliteStateStore

    parser = stream_parser()
    args = parser.parse_args(argv)
    try:
        admission = AdmissionConfig(args.on_bad_event, args.dead_letter, args.on_unknown_item)
    except ValueError as err:
        parser.error(str(err))
    engine = _engine(args)
    output = args.output or args.state.with_name(args.state.name + ".outputs.jsonl")
    store = SqliteStateStore(args.state)
    try:
        counts = run_stream(engine, store, args.events, output, args.chunk_rows, admission, args.overwrite,
                            args.accelerator)
    finally:
        store.close()
    print(f"ksa-rec stream: {counts.line()}")
    if args.summary:
        _write_json(args.summary, counts.as_dict())
    print(f"ksa-rec stream: states in {args.state}, recommendations in {output}")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
