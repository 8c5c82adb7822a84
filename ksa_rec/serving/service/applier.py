"""One micro-batch of ``POST /events`` requests: admit, step, commit, answer. Runs on the service's one
worker thread, so micro-batches are applied one at a time in the order they were formed.

The users of the requests in one micro-batch are disjoint (``batcher`` starts a new micro-batch when a
request touches a user already in the current one), so each request is admitted on its own against the
stored states (``admission.Admission``: exactly-once by event identity, the bad-event policy) and a bad
request is refused without touching the others. The admitted events of all requests then go through the
model's step in one call (``StreamEngine.apply``, the code ``stream`` runs) and are committed in one store
transaction before any response is sent: an acknowledged event is in the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from ksa_rec.errors import DataError, StateError
from ksa_rec.serving.admission import Admission, AdmissionConfig, StreamCounts
from ksa_rec.serving.engine import Recommendations, StreamEngine
from ksa_rec.serving.jobs import MODEL_KEY
from ksa_rec.serving.service.metrics import ServiceMetrics
from ksa_rec.serving.service.payload import REQUEST, EventsRequest
from ksa_rec.serving.state import UserState
from ksa_rec.serving.store import StateStore

_COUNTED = [f.name for f in fields(StreamCounts) if f.name != "users"]


@dataclass
class Outcome:
    """A request's answer: HTTP status and JSON body."""

    status: int
    body: dict


def error(status: int, reason: str) -> Outcome:
    return Outcome(status, {"error": reason})


class Applier:
    def __init__(self, engine: StreamEngine, store: StateStore, admission: AdmissionConfig,
                 metrics: ServiceMetrics):
        self.engine, self.store, self.admission, self.metrics = engine, store, admission, metrics

    def apply(self, requests: list[EventsRequest]) -> list[Outcome]:
        """Outcomes in request order. A store failure fails every request of the micro-batch (503: nothing
        of it was committed, a retry is safe)."""
        users = list(dict.fromkeys(u for request in requests for u in request.users))
        self.metrics.batch_requests.observe(len(requests))
        self.metrics.batch_events.observe(sum(r.frame.height + len(r.bad_rows) for r in requests))
        try:
            started = time.perf_counter()
            self.store.claim(users)
            blobs = self.store.get_many(users)
            self.metrics.store_seconds.labels("read").observe(time.perf_counter() - started)
            try:
                return self._apply(requests, blobs)
            finally:
                self.store.release()  # after a commit there is nothing left to release
        except StateError as err:
            return [error(503, f"state store: {err}")] * len(requests)

    def _apply(self, requests: list[EventsRequest], blobs: dict[str, bytes]) -> list[Outcome]:
        gate = Admission(self.admission, self.engine.serving.items, self.engine.serving.features)
        outcomes: list[Outcome | None] = [None] * len(requests)
        counts: list[dict[str, int]] = [{}] * len(requests)
        states: dict[str, UserState] = {}
        parts = []
        for i, request in enumerate(requests):
            before = _snapshot(gate.counts)
            try:
                gate.reject_malformed(request.bad_rows, REQUEST)
                mine = dict(zip(request.users, self.engine.decode_states(request.users, blobs)))
                admitted = gate.admit(request.frame, mine, REQUEST)
            except (DataError, StateError) as err:
                outcomes[i] = error(422, str(err))
                continue
            after = _snapshot(gate.counts)
            counts[i] = {name: after[name] - before[name] for name in _COUNTED}
            states.update(mine)
            if admitted.frame.height:
                parts.append(admitted)
        for name in _COUNTED:
            self.metrics.events.labels(name).inc(getattr(gate.counts, name))
        fresh: dict[str, tuple] = {}
        if parts:
            started = time.perf_counter()
            new_blobs, recs = self.engine.apply(parts, states)
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            started = time.perf_counter()
            self.store.commit(new_blobs, {MODEL_KEY: self.engine.serving.model_id})
            self.metrics.store_seconds.labels("commit").observe(time.perf_counter() - started)
            fresh.update(_by_user(recs))
        # Users with nothing applied (every event a replay, say): their top-K from the state as it is.
        unchanged = [u for u in states if u not in fresh]
        if unchanged:
            fresh.update(_by_user(self.engine.recommend(unchanged, [states[u] for u in unchanged],
                                                        [0] * len(unchanged))))
        for i, request in enumerate(requests):
            if outcomes[i] is None:
                outcomes[i] = Outcome(200, {"counts": counts[i],
                                            "recommendations": [fresh[u] for u in request.users if u in fresh]})
        return outcomes

    def recommend(self, user: str, k: int) -> Outcome:
        """``GET /recommendations``: the stored state's top-``k`` (no claim: reads the last commit)."""
        started = time.perf_counter()
        try:
            blob = self.store.get_many([user]).get(user)
        except StateError as err:
            return error(503, f"state store: {err}")
        self.metrics.store_seconds.labels("read").observe(time.perf_counter() - started)
        if blob is None:
            return error(404, f"user {user!r} has no state in this store")
        try:
            state = self.engine.decode_states([user], {user: blob})[0]
        except StateError as err:
            return error(409, str(err))
        return Outcome(200, _by_user(self.engine.recommend([user], [state], [0], top_k=k))[user])


def _snapshot(counts: StreamCounts) -> dict[str, int]:
    return {name: getattr(counts, name) for name in _COUNTED}


def _by_user(recs: Recommendations) -> dict[str, dict]:
    return {u: {"user_id": u, "event_count": n, "item_ids": items, "scores": scores}
            for u, n, items, scores in zip(recs.user_ids, recs.event_counts, recs.item_ids, recs.scores)}
