"""``ksa-rec serve`` end to end: the real server (a subprocess on a free port), the real redis-server, real
HTTP. Final states are compared with ``ksa-rec stream`` over the same acknowledged events in
acknowledged order."""

import asyncio
import json
import subprocess
import sys

import httpx
import polars as pl
import pytest
from service_checks import ROOT, Server, events_body, store_blobs
from stream_checks import assert_same_states, stream

from ksa_rec.serving.admission import event_identities
from ksa_rec.serving.artifact import ServingModel
from ksa_rec.serving.state import UserState

pytestmark = pytest.mark.slow
COLUMNS = ["user_id", "item_id", "timestamp", "category"]
# The service steps a user's events in other micro-batches than one stream run does; a step's matmuls sum
# in an order that depends on their shapes, so float tensors agree to rounding, not bit for bit (with
# TOL = 0 these tests fail by at most 4e-7, float32 rounding; every integer part (event counts, identities,
# seen sets, cache indices) is asserted exactly).
TOL = 1e-4


def _events(trained, users: int, per_user: int) -> pl.DataFrame:
    """``users`` users (copies of the trained users under new ids), each with its first ``per_user`` events."""
    _, frame = trained
    base = frame.select(COLUMNS).group_by("user_id", maintain_order=True).head(per_user)
    originals = base["user_id"].unique(maintain_order=True).to_list()
    parts = [base.filter(pl.col("user_id") == originals[i % len(originals)])
             .with_columns(pl.lit(f"user{i:04d}").alias("user_id")) for i in range(users)]
    return pl.concat(parts)


def _reference(checkpoint, ordered: pl.DataFrame, tmp_path, name: str = "ref") -> dict[str, bytes]:
    """States ``stream`` makes from ``ordered`` (one micro-batch)."""
    path = tmp_path / f"{name}.jsonl"
    ordered.select(COLUMNS).write_ndjson(path)
    assert stream(checkpoint, path, tmp_path / f"{name}.db", "--chunk-rows", "100000") == 0
    return store_blobs(tmp_path / f"{name}.db")


async def _send_users(urls: list[str], per_user: list[pl.DataFrame], clients: int, acked: list) -> list:
    """Each user's events one request at a time, in order (the next after the previous is acknowledged),
    request j of a user to ``urls[j % len(urls)]``; ``clients`` users at once. ``acked`` receives each
    acknowledged (event row, response) in acknowledgement order. Returns the unanswered events."""
    queue = list(per_user)
    in_doubt = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            events = queue.pop()
            for j in range(events.height):
                row = events[j]
                try:
                    response = await http.post(urls[j % len(urls)] + "/events", json=events_body(row))
                except httpx.TransportError:
                    in_doubt.append(row)
                    return
                assert response.status_code == 200, response.text
                acked.append((row, response.json()))

    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return in_doubt


# ---- endpoints ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    checkpoint, _ = trained
    with Server(checkpoint, tmp_path_factory.mktemp("serve") / "s.db", "--max-request-events", "8",
                "--max-body-bytes", "4000") as running:
        yield running


def test_post_applies_answers_top_k_and_a_retry_is_not_applied_twice(server, trained):
    events = _events(trained, 1, 3).with_columns(pl.lit("contract").alias("user_id"))
    first = httpx.post(server.url + "/events", json=events_body(events))
    assert first.status_code == 200
    body = first.json()
    assert body["counts"]["applied"] == 3 and body["counts"]["replayed"] == 0
    [recs] = body["recommendations"]
    assert recs["user_id"] == "contract" and recs["event_count"] == 3 and len(recs["item_ids"]) == 10
    assert not set(recs["item_ids"]) & set(events["item_id"])  # seen items excluded
    retry = httpx.post(server.url + "/events", json=events_body(events)).json()
    assert retry["counts"]["applied"] == 0 and retry["counts"]["replayed"] == 3
    assert retry["recommendations"] == body["recommendations"]
    stored = httpx.get(server.url + "/recommendations/contract", params={"k": 4}).json()
    assert stored == {**recs, "item_ids": recs["item_ids"][:4], "scores": recs["scores"][:4]}


def test_health_and_metrics(server):
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and len(health["model_id"]) == 16
    text = httpx.get(server.url + "/metrics").text
    for name in ("ksa_rec_requests_total", "ksa_rec_request_seconds_bucket", "ksa_rec_batch_requests_bucket",
                 "ksa_rec_batch_events_bucket", "ksa_rec_store_seconds_bucket", "ksa_rec_step_seconds_bucket",
                 'ksa_rec_events_total{outcome="applied"}'):
        assert name in text


def _event(**change):
    return {"user_id": "bad", "item_id": "i000001", "timestamp": 100, "category": "c01", **change}


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "malformed JSON: "),
    (b'[1, 2]', 422, 'the body must be a JSON object {"events": [...]}'),
    (json.dumps({"events": [_event()], "extra": 1}).encode(), 422, "unknown field 'extra'"),
    (json.dumps({"events": [_event(rating=5)]}).encode(), 422, "event 1: unknown field 'rating'"),
    (json.dumps({"events": [{"user_id": "bad", "item_id": "i1"}]}).encode(), 422, "event 1: missing field 'timestamp'"),
    (json.dumps({"events": []}).encode(), 422, '"events" must be a non-empty list'),
    (json.dumps({"events": [_event(timestamp="soon")]}).encode(), 422, "request: row 1, column 'timestamp': "),
    (json.dumps({"events": [_event()] * 9}).encode(), 413, "9 events in one request; at most 8"),
    (json.dumps({"events": [_event(item_id="x" * 5000)]}).encode(), 413, "body of "),
])
def test_bad_requests_are_4xx_with_one_line(server, body, status, reason):
    response = httpx.post(server.url + "/events", content=body)
    assert response.status_code == status
    assert response.json()["error"].startswith(reason) and "\n" not in response.json()["error"]


def test_late_events_are_refused_and_change_nothing(server):
    first = httpx.post(server.url + "/events", json={"events": [_event(user_id="late", timestamp=200)]})
    assert first.status_code == 200
    response = httpx.post(server.url + "/events", json={"events": [_event(user_id="late", item_id="i000002",
                                                                          timestamp=100)]})
    assert response.status_code == 422
    assert "timestamp 100 is before the user's previous event (200)" in response.json()["error"]
    assert httpx.get(server.url + "/recommendations/late").json()["event_count"] == 1


def test_a_new_user_whose_first_event_is_an_unknown_item(server):
    """Its seen set stays empty (an empty np.union1d, stride 0): the state is stored, not a 500."""
    response = httpx.post(server.url + "/events", json={"events": [_event(user_id="oov-first", item_id="never")]})
    assert response.status_code == 200 and response.json()["counts"]["applied"] == 1
    assert httpx.get(server.url + "/recommendations/oov-first").json()["event_count"] == 1


def test_recommendations_refusals(server):
    assert httpx.get(server.url + "/recommendations/nobody").status_code == 404
    for query in ({"k": "0"}, {"k": "x"}, {"k": "1001"}, {"top": "3"}):
        response = httpx.get(server.url + "/recommendations/nobody", params=query)
        assert response.status_code == 422 and "\n" not in response.json()["error"]


def test_a_second_server_on_one_sqlite_store_is_refused(server, trained, tmp_path):
    checkpoint, _ = trained
    store = httpx.get(server.url + "/healthz").json()["store"]
    done = subprocess.run([sys.executable, "-m", "ksa_rec.cli", "serve", "--checkpoint", str(checkpoint), "--state",
                           store, "--accelerator", "cpu"], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stderr.strip().startswith("ksa-rec serve: error: ") and "one writer per store" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ---- order, concurrency, workers ----------------------------------------------------------------------------
def _identities(frame: pl.DataFrame) -> list[int]:
    return event_identities(frame, ["category"]).tolist()


async def _concurrent_one_user(urls: list[str], events: pl.DataFrame) -> list[dict]:
    async with httpx.AsyncClient(timeout=60) as http:
        responses = await asyncio.gather(*(http.post(urls[j % len(urls)] + "/events", json=events_body(events[j]))
                                           for j in range(events.height)))
    assert [r.status_code for r in responses] == [200] * events.height
    return [r.json() for r in responses]


def _same_second(trained, n: int) -> pl.DataFrame:
    """``n`` events of one user at one timestamp (any order is in time order: the service picks one)."""
    return _events(trained, 1, n).with_columns(pl.lit(1_000_000, dtype=pl.Int64).alias("timestamp"),
                                               pl.lit("hot").alias("user_id"))


def _in_acknowledged_order(events: pl.DataFrame, responses: list[dict]) -> pl.DataFrame:
    """Each response's event_count is its event's position in the user's history: concurrent requests for
    one user were applied one at a time, each on the state the previous one left."""
    positions = [r["recommendations"][0]["event_count"] for r in responses]
    assert sorted(positions) == list(range(1, events.height + 1))
    return events[[positions.index(p) for p in range(1, events.height + 1)]]


def test_concurrent_requests_for_one_user_are_applied_one_after_another(trained, tmp_path):
    checkpoint, _ = trained
    events = _same_second(trained, 16)
    with Server(checkpoint, tmp_path / "s.db", "--batch-window-ms", "20") as server:
        responses = asyncio.run(_concurrent_one_user([server.url], events))
    ordered = _in_acknowledged_order(events, responses)
    assert_same_states(checkpoint, store_blobs(tmp_path / "s.db"), _reference(checkpoint, ordered, tmp_path), TOL)


def test_two_workers_share_one_redis(trained, redis_url, tmp_path):
    checkpoint, _ = trained
    hot = _same_second(trained, 12)
    users = _events(trained, 40, 6)
    with Server(checkpoint, redis_url) as a, Server(checkpoint, redis_url) as b:
        # One user from both workers at once: claimed per micro-batch, applied one at a time.
        responses = asyncio.run(_concurrent_one_user([a.url, b.url], hot))
        # Many users, each one's events alternating between the workers.
        acked: list = []
        asyncio.run(_send_users([a.url, b.url], users.partition_by("user_id", maintain_order=True), 8, acked))
    assert len(acked) == users.height
    ordered = pl.concat([_in_acknowledged_order(hot, responses), *[row for row, _ in acked]])
    assert_same_states(checkpoint, store_blobs(redis_url), _reference(checkpoint, ordered, tmp_path), TOL)


def test_thousand_users_with_concurrent_clients_end_as_stream(trained, tmp_path):
    checkpoint, _ = trained
    users = _events(trained, 1000, 2)
    acked: list = []
    with Server(checkpoint, tmp_path / "s.db") as server:
        asyncio.run(_send_users([server.url], users.partition_by("user_id", maintain_order=True), 16, acked))
        batches = [line for line in httpx.get(server.url + "/metrics").text.splitlines()
                   if line.startswith("ksa_rec_batch_requests_count")]
    assert len(acked) == users.height == 2000
    assert float(batches[0].split()[-1]) < 2000  # concurrent requests were batched
    ordered = pl.concat([row for row, _ in acked])
    assert_same_states(checkpoint, store_blobs(tmp_path / "s.db"), _reference(checkpoint, ordered, tmp_path), TOL)


# ---- kill -9 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_kill_9_mid_load_then_restart_keeps_every_acknowledged_event_once(trained, kind, redis_server, tmp_path):
    checkpoint, _ = trained
    if kind == "redis":
        redis_server.client.flushall()
    state = tmp_path / "s.db" if kind == "sqlite" else redis_server.url(0)
    users = _events(trained, 100, 8)
    per_user = users.partition_by("user_id", maintain_order=True)
    acked: list = []

    async def load_and_kill(server: Server) -> list:
        async def killer():
            while len(acked) < 150:
                await asyncio.sleep(0.01)
            server.kill9()
        sending = _send_users([server.url], per_user, 8, acked)
        return (await asyncio.gather(sending, killer()))[0]

    server = Server(checkpoint, state)
    in_doubt = asyncio.run(load_and_kill(server))
    assert 150 <= len(acked) < users.height and in_doubt  # killed mid-load
    model_id = ServingModel.load(checkpoint).model_id
    with Server(checkpoint, state) as restarted:
        states = {u: UserState.from_bytes(b, model_id, u) for u, b in store_blobs(state).items()}
        for row, _ in acked:  # every acknowledged event is in its user's state, exactly once
            user = row["user_id"][0]
            assert states[user].recent_ids.tolist().count(_identities(row)[0]) == 1
        # Clients retry everything: only what is missing is applied, and the end equals one stream run.
        again: list = []
        asyncio.run(_send_users([restarted.url], per_user, 8, again))
    applied = sum(response["counts"]["applied"] for _, response in again)
    assert applied == users.height - sum(s.event_count for s in states.values())
    assert sum(s.event_count for s in states.values()) - len(acked) <= len(in_doubt)
    assert_same_states(checkpoint, store_blobs(state), _reference(checkpoint, users, tmp_path), TOL)
