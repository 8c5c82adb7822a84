"""Settings of ``ksa-rec serve`` (each one is also a command-line option, ``ksa_rec.serving.cli``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """How the service batches requests and what it accepts."""

    top_k: int = 10
    """Recommendations returned per touched user by ``POST /events`` (``GET`` takes ``?k=``)."""
    max_k: int = 1000
    """Largest ``k`` a ``GET /recommendations`` may ask for."""
    batch_window_ms: float = 1.0
    """How long the first request of a micro-batch waits for others to join it (requests that arrive
    while the worker is busy join the next micro-batch anyway)."""
    max_batch_events: int = 512
    """Most events in one micro-batch (one model step, one store commit); a request is never split."""
    max_request_events: int = 256
    """Most events in one request (more: 413)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (more: 413)."""
    max_queue: int = 256
    """Most requests waiting for a micro-batch; more are answered 503 at once (nothing applied, retry
    later) instead of queueing for seconds behind work whose clients have given up."""

    def __post_init__(self) -> None:
        for name in ("top_k", "max_k", "max_batch_events", "max_request_events", "max_body_bytes", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.max_request_events > self.max_batch_events:
            raise ValueError("max_request_events may not exceed max_batch_events (a request is never split)")
