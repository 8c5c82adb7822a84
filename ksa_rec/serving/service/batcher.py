"""Dynamic micro-batching of ``POST /events`` with per-user order.

Requests wait in one FIFO queue. A micro-batch starts with the oldest request and takes the next ones
while the collection window (``batch_window_ms``, from the first request) is open and the batch has room
(``max_batch_events``). A request that touches a user already in the batch closes it: it opens the next
batch instead, so each user is in at most one request of a batch. Micro-batches run one at a time on
the single worker thread (``worker``), which also owns the store and the model, and every request of a
batch is answered after its commit. Hence two requests for one user are applied in arrival order, one
after the other, never interleaved, and acknowledged in that same order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ksa_rec.serving.service.applier import Outcome
from ksa_rec.serving.service.payload import EventsRequest

T = TypeVar("T")


class Worker:
    """The one thread that touches the model and the store (a SQLite connection belongs to the thread
    that opened it; one thread also keeps micro-batches strictly one after the other)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ksa-rec-serve")

    def call(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn`` there and wait (start-up and shutdown)."""
        return self.pool.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class MicroBatcher:
    def __init__(self, apply: Callable[[list[EventsRequest]], list[Outcome]], worker: Worker, window_ms: float,
                 max_events: int, max_queue: int):
        self.apply, self.worker = apply, worker
        self.window, self.max_events, self.max_queue = window_ms / 1000, max_events, max_queue
        self.queue: asyncio.Queue[tuple[EventsRequest, asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, request: EventsRequest) -> Outcome:
        if self.queue.qsize() >= self.max_queue:
            return Outcome(503, {"error": f"overloaded: {self.queue.qsize()} requests are waiting (--max-queue); "
                                          "nothing was applied, retry later"})
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    async def _loop(self) -> None:
        waiting = None  # the request that closed the last batch: it opens the next one
        while True:
            first = waiting or await self.queue.get()
            waiting = None
            batch = [first]
            users = set(first[0].users)
            size = _events(first[0])
            deadline = asyncio.get_running_loop().time() + self.window
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    item = self.queue.get_nowait() if remaining <= 0 else \
                        await asyncio.wait_for(self.queue.get(), remaining)
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if users.intersection(item[0].users) or size + _events(item[0]) > self.max_events:
                    waiting = item
                    break
                batch.append(item)
                users.update(item[0].users)
                size += _events(item[0])
            try:
                outcomes = await self.worker.run(self.apply, [request for request, _ in batch])
            except Exception as err:  # a bug, not bad input: answer every request of the batch, keep serving
                outcomes = [Outcome(500, {"error": f"internal error: {type(err).__name__}: {err}"})] * len(batch)
            for (_, future), outcome in zip(batch, outcomes):
                if not future.done():  # the client may have gone away
                    future.set_result(outcome)


def _events(request: EventsRequest) -> int:
    return request.frame.height + len(request.bad_rows)
