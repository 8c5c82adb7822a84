"""What ``GET /metrics`` exposes (Prometheus text format), in one registry per service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Latencies from 0.5 ms to 2.5 s: the CPU service answers in milliseconds, a saturated one in seconds.
_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ksa_rec_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("ksa_rec_request_seconds", "Time from a request's arrival to its response",
                                 ["endpoint"], buckets=_SECONDS, registry=r)
        self.batch_requests = Histogram("ksa_rec_batch_requests", "Requests per micro-batch", buckets=_SIZES,
                                        registry=r)
        self.batch_events = Histogram("ksa_rec_batch_events", "Events per micro-batch", buckets=_SIZES, registry=r)
        self.store_seconds = Histogram("ksa_rec_store_seconds", "State-store time per micro-batch or read",
                                       ["op"], buckets=_SECONDS, registry=r)
        self.step_seconds = Histogram("ksa_rec_step_seconds", "Model step and top-K per micro-batch",
                                      buckets=_SECONDS, registry=r)
        self.events = Counter("ksa_rec_events", "Events by what admission did with them", ["outcome"], registry=r)
