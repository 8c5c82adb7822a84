"""User states in Redis, shared by several ``serve`` and ``stream`` workers (the ``StateStore`` interface).

Keys, under a prefix (``ksa_rec`` unless given): ``<prefix>:meta`` a hash of the bookkeeping (store format,
model id, sink positions), ``<prefix>:state:<user_id>`` a user's state blob, ``<prefix>:claim:<user_id>``
which writer holds the user now. Select a database (``redis://host:port/db``) to keep stores apart.

**Any worker may take any user.** Requests need no routing: before reading the users of a micro-batch a
writer claims them all at once (a Lua script sets each ``claim`` key to the writer's token with a lease
of ``lease_s``, or sets none if another writer holds one; then the writer waits and tries again). The
commit is one Lua script too: it checks that the writer still holds every user it writes (a writer that
stalled past its lease is refused, so it can never overwrite a newer state), checks the model id, writes
the states and the bookkeeping and drops the claims, all or nothing (Redis runs a script alone). Two
requests for one user sent to two workers are therefore applied one after the other, each on the state
the other committed. A writer killed with ``kill -9`` leaves its claims behind for at most ``lease_s``.

Durability is Redis's: a commit is in Redis's memory when the script returns, and on disk as Redis's own
persistence says (``appendonly yes`` with ``appendfsync always`` writes each commit to the AOF before
replying; the tests and the README's set-up start Redis that way).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import redis

from ksa_rec.errors import StateError
from ksa_rec.serving.store import FORMAT_KEY, STORE_FORMAT

GUARDED_META_KEY = "model_id"
"""Bookkeeping that no commit may change once set: the model id (``jobs.MODEL_KEY``), so two workers
started with different checkpoints refuse to mix their states in one store."""

_CLAIM = """
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder and holder ~= ARGV[1] then return holder end
end
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) end
return false
"""

# KEYS: meta, n state keys, n claim keys. ARGV: token, n, guarded key, then n blobs, then meta key/value pairs.
_COMMIT = """
local n = tonumber(ARGV[2])
for i = 1, n do
  if redis.call('GET', KEYS[1 + n + i]) ~= ARGV[1] then
    return redis.error_reply('lost the claim on ' .. KEYS[1 + i] .. ' (lease expired and another writer took it)')
  end
end
for j = 4 + n, #ARGV, 2 do
  if ARGV[j] == ARGV[3] then
    local held = redis.call('HGET', KEYS[1], ARGV[j])
    if held and held ~= ARGV[j + 1] then
      return redis.error_reply('the store holds states of model ' .. held .. ', not ' .. ARGV[j + 1])
    end
  end
end
for i = 1, n do redis.call('SET', KEYS[1 + i], ARGV[3 + i]) end
if #ARGV >= 4 + n then redis.call('HSET', KEYS[1], unpack(ARGV, 4 + n)) end
for i = 1, n do redis.call('DEL', KEYS[1 + n + i]) end
return n
"""

_RELEASE = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return true
"""


class RedisStateStore:
    """``StateStore`` on one Redis database. ``read_only``: the store must exist (``score``), nothing is
    written. ``lease_s``: how long a claim lives (its holder commits within it, or loses it);
    ``wait_s``: how long a claim waits for users another writer holds before failing in one line."""

    def __init__(self, url: str, *, read_only: bool = False, prefix: str = "ksa_rec", lease_s: float = 5.0,
                 wait_s: float = 10.0):
        self.url, self.prefix, self.lease_s, self.wait_s = url, prefix, lease_s, wait_s
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._claimed: list[str] = []
        try:
            self.client = redis.Redis.from_url(url, socket_connect_timeout=5)
        except ValueError as err:
            raise StateError(f"{url}: not a usable Redis URL ({err})") from None
        self._claim = self.client.register_script(_CLAIM)
        self._commit = self.client.register_script(_COMMIT)
        self._release = self.client.register_script(_RELEASE)
        self._check_format(read_only)

    def _redis_error(self, err: redis.RedisError) -> StateError:
        return StateError(f"{self.url}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")

    def _check_format(self, read_only: bool) -> None:
        meta_key = f"{self.prefix}:meta"
        try:
            if not read_only:
                self.client.hsetnx(meta_key, FORMAT_KEY, STORE_FORMAT)
            found = self.client.hget(meta_key, FORMAT_KEY)
        except redis.RedisError as err:
            raise self._redis_error(err) from None
        if found is None:
            raise StateError(f"{self.url}: no ksa-rec state store here (no {meta_key} hash)")
        if found.decode() != STORE_FORMAT:
            raise StateError(f"{self.url}: state store format {found.decode()!r}, this version reads "
                             f"{STORE_FORMAT!r}; rebuild it: stream the events again into a new store")

    def _state_key(self, user: str) -> str:
        return f"{self.prefix}:state:{user}"

    def _claim_key(self, user: str) -> str:
        return f"{self.prefix}:claim:{user}"

    def claim(self, user_ids: list[str]) -> None:
        if self._claimed:
            raise RuntimeError("claim() while a claim is held: commit or release it first")
        keys = [self._claim_key(u) for u in user_ids]
        deadline = time.monotonic() + self.wait_s
        try:
            while (holder := self._claim(keys=keys, args=[self.token, int(self.lease_s * 1000)])) is not None:
                if time.monotonic() > deadline:
                    raise StateError(f"{self.url}: users of this micro-batch have been held by another writer "
                                     f"({holder.decode()}) for {self.wait_s:g} s")
                time.sleep(0.001)
        except redis.RedisError as err:
            raise self._redis_error(err) from None
        self._claimed = list(user_ids)

    def release(self) -> None:
        if self._claimed:
            keys, self._claimed = [self._claim_key(u) for u in self._claimed], []
            try:
                self._release(keys=keys, args=[self.token])
            except redis.RedisError as err:
                raise self._redis_error(err) from None

    def get_many(self, user_ids: list[str]) -> dict[str, bytes]:
        if not user_ids:
            return {}
        try:
            blobs = self.client.mget([self._state_key(u) for u in user_ids])
        except redis.RedisError as err:
            raise self._redis_error(err) from None
        return {u: b for u, b in zip(user_ids, blobs) if b is not None}

    def commit(self, states: dict[str, bytes], meta: dict[str, str]) -> None:
        users = list(states)
        missing = set(users) - set(self._claimed)
        if missing:
            raise RuntimeError(f"commit of users not claimed first: {sorted(missing)[:3]}")
        keys = [f"{self.prefix}:meta", *map(self._state_key, users), *map(self._claim_key, users)]
        pairs = [x for kv in meta.items() for x in kv]
        try:
            self._commit(keys=keys, args=[self.token, len(users), GUARDED_META_KEY, *states.values(), *pairs])
        except redis.RedisError as err:
            self._claimed = [u for u in self._claimed if u not in states]
            self.release()
            raise self._redis_error(err) from None
        # Users claimed but not written (no applied event) are still held: let them go.
        self._claimed = [u for u in self._claimed if u not in states]
        self.release()

    def meta(self) -> dict[str, str]:
        try:
            raw = self.client.hgetall(f"{self.prefix}:meta")
        except redis.RedisError as err:
            raise self._redis_error(err) from None
        return {k.decode(): v.decode() for k, v in raw.items()}

    def _users(self) -> list[str]:
        start = len(self._state_key(""))
        try:
            keys = self.client.scan_iter(match=self._state_key("*"), count=1000)
            return sorted(key.decode()[start:] for key in keys)
        except redis.RedisError as err:
            raise self._redis_error(err) from None

    def scan(self, batch_size: int) -> Iterator[list[tuple[str, bytes]]]:
        users = self._users()
        for start in range(0, len(users), batch_size):
            chunk = users[start:start + batch_size]
            rows = [(u, b) for u, b in self.get_many(chunk).items()]
            if rows:
                yield rows

    def __len__(self) -> int:
        return len(self._users())

    def close(self) -> None:
        try:
            self.release()
        except StateError:
            pass  # the claims lapse with their lease
        self.client.close()
