"""``ksa-rec score`` and ``ksa-rec stream`` (command-line contract of ARCHITECTURE.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    source.add_argument("--state", help="state store written by ksa-rec stream or serve (a SQLite file, or "
                        "redis://host:port/db); opened read-only")
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
    _add_state(p)
    p.add_argument("--output", type=Path, default=None,
                   help="sink: .jsonl file or a parquet parts directory (default: <state>.outputs.jsonl; "
                        "required with a Redis store)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output that this state store did not write")
    p.add_argument("--top-k", type=positive_int, default=10)
    _add_seen_items(p)
    p.add_argument("--chunk-rows", type=positive_int, default=4096, help="events per micro-batch (one commit each)")
    p.add_argument("--item-chunk", type=positive_int, default=65536)
    _add_admission(p)
    p.add_argument("--summary", type=Path, default=None, help="also write the run's counts to this JSON file")
    p.add_argument("--accelerator", default="auto")
    _add_backend_option(p)
    return p


def serve_parser() -> argparse.ArgumentParser:
    from ksa_rec.serving.service.config import ServeConfig

    d = ServeConfig()
    p = _Parser(prog="ksa-rec serve", description="HTTP service: POST /events applies events to per-user states "
                "(the stream's step, exactly-once by event identity) and answers each touched user's fresh "
                "top-K; GET /recommendations/USER?k=, /healthz, /metrics. See README, Serve online.")
    p.add_argument("--checkpoint", required=True)
    _add_state(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--top-k", type=positive_int, default=d.top_k, help="recommendations per user from POST /events")
    p.add_argument("--max-k", type=positive_int, default=d.max_k, help="largest k of GET /recommendations")
    _add_seen_items(p)
    p.add_argument("--item-chunk", type=positive_int, default=65536)
    _add_admission(p)
    p.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                   help="how long a micro-batch's first request waits for others")
    p.add_argument("--max-batch-events", type=positive_int, default=d.max_batch_events,
                   help="most events in one micro-batch (one step, one commit)")
    p.add_argument("--max-request-events", type=positive_int, default=d.max_request_events,
                   help="most events in one request (more: 413)")
    p.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes,
                   help="largest request body (more: 413)")
    p.add_argument("--max-queue", type=positive_int, default=d.max_queue,
                   help="most requests waiting for a micro-batch (more: 503 at once, nothing applied)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads of the model step and of polars (default 1: a micro-batch is small, and more "
                        "threads fight the HTTP thread and each other on a small machine)")
    p.add_argument("--accelerator", default="auto")
    _add_backend_option(p)
    return p


def _add_state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True,
                   help="state store: a SQLite file (created if missing; one writer process at a time) or "
                        "redis://host:port/db (shared by several workers)")
    p.add_argument("--step", choices=("jagged", "graphed", "fixed"), default="jagged",  # engine.STEPS
                   help="how a micro-batch is stepped: jagged (any events per user, every kind), graphed (one event "
                        "per user replayed from CUDA graphs in fixed-capacity buffers; CUDA, kinds full/ksa/sca/swa; "
                        "other micro-batches take the jagged step) or fixed (the same without graphs)")
    p.add_argument("--state-dtype", choices=("fp32", "bf16"), default="fp32",  # engine.STATE_DTYPES
                   help="float tensors of stored states: fp32, or bf16 (half the bytes; see "
                        "docs/results/serving.md for its effect on recommendations)")


def _add_admission(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-bad-event", choices=("error", "skip", "dead-letter"), default="error",
                   help="a malformed or late event: stop with one line (error), count it and go on (skip), or "
                        "also append it to --dead-letter")
    p.add_argument("--dead-letter", type=Path, default=None,
                   help="JSON lines file for rejected events (file, row, column, kind, reason, raw)")
    p.add_argument("--on-unknown-item", choices=("oov", "skip", "error"), default="oov",
                   help="an item id the checkpoint does not know: apply it as out-of-vocabulary (oov), count "
                        "it and leave it out (skip), or stop (error)")


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
    return StreamEngine(serving, top_k=args.top_k, exclude_seen=args.seen_items == "mask", item_chunk=args.item_chunk,
                        state_dtype=getattr(args, "state_dtype", "fp32"), step=getattr(args, "step", "jagged"))


def score(argv: list[str]) -> None:
    from ksa_rec.serving.jobs import run_score
    from ksa_rec.serving.store import open_store

    args = score_parser().parse_args(argv)
    engine = _engine(args)
    store = open_store(args.state, read_only=True) if args.state else None
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
    from ksa_rec.serving.store import is_redis_url, open_store

    parser = stream_parser()
    args = parser.parse_args(argv)
    try:
        admission = AdmissionConfig(args.on_bad_event, args.dead_letter, args.on_unknown_item)
    except ValueError as err:
        parser.error(str(err))
    if args.output is None and is_redis_url(args.state):
        parser.error("--output is required with a Redis --state")
    engine = _engine(args)
    output = args.output or Path(args.state + ".outputs.jsonl")
    store = open_store(args.state)
    try:
        counts = run_stream(engine, store, args.events, output, args.chunk_rows, admission, args.overwrite,
                            args.accelerator)
    finally:
        store.close()
    print(f"ksa-rec stream: {counts.line()}")
    if args.summary:
        _write_json(args.summary, counts.as_dict())
    print(f"ksa-rec stream: states in {args.state}, recommendations in {output}")


def serve(argv: list[str]) -> None:
    parser = serve_parser()
    args = parser.parse_args(argv)
    # Before polars and torch are first imported: their thread pools are sized once, at import.
    for name in ("POLARS_MAX_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, str(args.threads))
    import torch
    import uvicorn

    from ksa_rec.serving.admission import AdmissionConfig
    from ksa_rec.serving.jobs import check_model
    from ksa_rec.serving.service.app import create_app
    from ksa_rec.serving.service.applier import Applier
    from ksa_rec.serving.service.batcher import Worker
    from ksa_rec.serving.service.config import ServeConfig
    from ksa_rec.serving.service.metrics import ServiceMetrics
    from ksa_rec.serving.store import open_store

    torch.set_num_threads(args.threads)
    # The worker thread gives the GIL up at every torch op; the HTTP thread, holding it meanwhile, hands it
    # back only after the switch interval (5 ms by default): ten or more such waits per step under load.
    sys.setswitchinterval(0.0005)
    try:
        admission = AdmissionConfig(args.on_bad_event, args.dead_letter, args.on_unknown_item)
        config = ServeConfig(top_k=args.top_k, max_k=args.max_k, batch_window_ms=args.batch_window_ms,
                             max_batch_events=args.max_batch_events, max_request_events=args.max_request_events,
                             max_body_bytes=args.max_body_bytes, max_queue=args.max_queue)
    except ValueError as err:
        parser.error(str(err))
    engine = _engine(args)
    worker = Worker()  # the store is opened, used and closed on the worker's thread
    worker.call(torch.set_num_threads, args.threads)
    store = worker.call(open_store, args.state)
    try:
        worker.call(check_model, store, engine.serving.model_id)
        applier = Applier(engine, store, admission, ServiceMetrics())

        def ready() -> None:
            print(f"ksa-rec serve: listening on http://{args.host}:{args.port} (state {args.state}, model "
                  f"{engine.serving.model_id})", flush=True)

        app = create_app(applier, worker, config, _without_password(args.state), ready)
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                      access_log=False)).run()
    finally:
        worker.call(store.close)
        worker.close()


def _without_password(state: str) -> str:
    """A --state value fit to show (/healthz): a Redis URL's password replaced by ***."""
    from urllib.parse import urlsplit

    parts = urlsplit(state)
    if parts.password is None:
        return state
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
