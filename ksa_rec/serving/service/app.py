"""The HTTP endpoints of ``ksa-rec serve`` (FastAPI).

    POST /events                    {"events": [...]} -> counts and each touched user's fresh top-K
    GET  /recommendations/{user}?k= top-k from the stored state (seen items excluded unless --seen-items keep)
    GET  /healthz                   liveness, model id, store
    GET  /metrics                   Prometheus text

Every refusal is a 4xx (5xx: the store failed, nothing was committed) with ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ksa_rec.serving.service.applier import Applier, Outcome, error
from ksa_rec.serving.service.batcher import MicroBatcher, Worker
from ksa_rec.serving.service.config import ServeConfig
from ksa_rec.serving.service.payload import RequestError, parse_events


def create_app(applier: Applier, worker: Worker, config: ServeConfig, store_name: str,
               on_ready: Callable[[], None] = lambda: None) -> FastAPI:
    """The service around an ``Applier`` whose store was opened on ``worker``'s thread."""
    engine, metrics = applier.engine, applier.metrics
    batcher = MicroBatcher(applier.apply, worker, config.batch_window_ms, config.max_batch_events,
                           config.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        on_ready()
        yield
        await batcher.stop()

    app = FastAPI(title="ksa-rec serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def answer(endpoint: str, outcome: Outcome, started: float) -> JSONResponse:
        metrics.requests.labels(endpoint, str(outcome.status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return JSONResponse(outcome.body, status_code=outcome.status)

    @app.post("/events")
    async def post_events(request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            body = await _read_body(request, config.max_body_bytes)
            events = parse_events(body, engine.schema, config.max_request_events)
        except RequestError as err:
            return answer("events", error(err.status, err.reason), started)
        return answer("events", await batcher.submit(events), started)

    @app.get("/recommendations/{user_id}")
    async def get_recommendations(user_id: str, request: Request) -> JSONResponse:
        started = time.perf_counter()
        unknown = sorted(set(request.query_params) - {"k"})
        text = request.query_params.get("k", str(config.top_k))
        if unknown:
            outcome = error(422, f"unknown query parameter {unknown[0]!r} (only k)")
        elif not text.isdigit() or not 1 <= int(text) <= config.max_k:
            outcome = error(422, f"k must be an integer from 1 to {config.max_k}, got {text!r}")
        else:
            outcome = await worker.run(applier.recommend, user_id, int(text))
        return answer("recommendations", outcome, started)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model_id": engine.serving.model_id, "store": store_name}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes: from Content-Length
    before reading, or while reading a body sent without one."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {int(declared)} bytes; at most {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body over {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)
