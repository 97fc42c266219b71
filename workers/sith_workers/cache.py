"""The engine's ``ArtifactCache`` in Redis: TTL, chunking of large values, single-flight.

Single-flight (concurrent identical requests cause one computation) works through the plain
get/put protocol the engine already uses: a miss takes a per-key redis-py ``Lock`` and re-checks;
if the value appeared meanwhile it is a hit, otherwise the caller — now the only one computing —
gets ``None`` and its ``put`` releases the lock. Everybody else blocks in ``get`` until that put,
then reads the value. Locks auto-expire (a crashed computer delays others, never blocks them; workers keep them short
and extend them from their heartbeat), and
a waiter that gives up computes itself: a duplicate computation, never a wrong or missing result.

Values are stored as one header byte + payload; values over ``chunk_bytes`` become a small manifest
plus chunk keys, so no single Redis value grows large. Any missing piece (evicted, flushed) is a
miss, i.e. a recomputation, never a failure.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable

import redis
from redis.exceptions import LockError

from sith_workers import metrics
from sith_workers.connection import outage_as_unavailable

INLINE = b"\x01"
CHUNKED = b"\x02"
DEFAULT_TTL_S = 7 * 24 * 3600
DEFAULT_CHUNK_BYTES = 1 << 20


class RedisArtifactCache:
    """Content-addressed bytes in Redis under ``{prefix}:cache:{key}``, expiring after ``ttl_s``
    (refreshed on every hit, so hot artifacts stay)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "sith", ttl_s: int = DEFAULT_TTL_S, *,
                 single_flight: bool = True, lock_timeout_s: float = 600.0, wait_timeout_s: float = 600.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self.single_flight = single_flight
        self.lock_timeout_s = lock_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.chunk_bytes = chunk_bytes
        self.stats_key = f"{prefix}:cache-stats"
        self.hits = self.misses = 0
        self._held: dict[str, redis.lock.Lock] = {}
        self._guard = threading.Lock()

    def key(self, key: str) -> str:
        return f"{self.prefix}:cache:{key}"

    # ---- ArtifactCache ------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """The value, or None — in which case (single-flight) the caller is expected to compute
        and ``put`` it; other callers of the same key wait for that put."""
        value = self._read(key)
        if value is not None:
            self._count("hit")
            return value
        if self.single_flight and key not in self._held:
            lock = self.redis.lock(f"{self.prefix}:lock:{key}", timeout=self.lock_timeout_s, sleep=0.05,
                                   blocking_timeout=self.wait_timeout_s, thread_local=False)
            with outage_as_unavailable(self.redis):
                acquired = lock.acquire()
            value = self._read(key)
            if value is not None:
                if acquired:
                    self._release(lock)
                self._count("hit")
                return value
            if acquired:
                with self._guard:
                    self._held[key] = lock
        self._count("miss")
        return None

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` (chunked when large) with the TTL, then release this key's lock."""
        value = bytes(value)
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            if len(value) <= self.chunk_bytes:
                pipe.set(self.key(key), INLINE + value, ex=self.ttl_s)
            else:
                count = 0
                for count, start in enumerate(range(0, len(value), self.chunk_bytes), start=1):
                    pipe.set(self._chunk(key, count - 1), value[start:start + self.chunk_bytes], ex=self.ttl_s)
                manifest = {"n": count, "size": len(value), "sha256": hashlib.sha256(value).hexdigest()}
                pipe.set(self.key(key), CHUNKED + json.dumps(manifest).encode(), ex=self.ttl_s)
            pipe.execute()
        with self._guard:
            lock = self._held.pop(key, None)
        if lock is not None:
            self._release(lock)

    # ---- conveniences -------------------------------------------------------------------------
    def get_or_compute(self, key: str, compute: Callable[[], bytes]) -> bytes:
        """``get``, else compute once (single-flight) and ``put``; the lock is released on error."""
        value = self.get(key)
        if value is not None:
            return value
        try:
            value = compute()
        except BaseException:
            self.abandon(key)
            raise
        self.put(key, value)
        return value

    def abandon(self, key: str) -> None:
        """Give up computing ``key`` (release its lock so a waiter can compute it)."""
        with self._guard:
            lock = self._held.pop(key, None)
        if lock is not None:
            self._release(lock)

    def extend_locks(self) -> None:
        """Reset the expiry of every lock this instance holds (the worker's heartbeat calls this,
        so locks can be short: a holder that dies frees its keys within ``lock_timeout_s``)."""
        with self._guard:
            locks = list(self._held.values())
        for lock in locks:
            try:
                lock.reacquire()
            except LockError:
                pass         # expired meanwhile: a waiter may compute too (duplicate, not wrong)

    def release_all(self) -> None:
        """Release every lock taken on a miss that was never followed by a put (end of a job)."""
        with self._guard:
            locks, self._held = list(self._held.values()), {}
        for lock in locks:
            self._release(lock)

    def stats(self) -> dict[str, int]:
        """Hit/miss counts across every process sharing this Redis (since its last flush)."""
        with outage_as_unavailable(self.redis):
            raw = self.redis.hgetall(self.stats_key)
        return {k.decode(): int(v) for k, v in raw.items()}

    # ---- internals ----------------------------------------------------------------------------
    def _chunk(self, key: str, index: int) -> str:
        return f"{self.key(key)}#{index}"

    def _read(self, key: str) -> bytes | None:
        with outage_as_unavailable(self.redis):
            head = self.redis.getex(self.key(key), ex=self.ttl_s)
            if head is None or head[:1] not in (INLINE, CHUNKED):
                return None
            if head[:1] == INLINE:
                return head[1:]
            manifest = json.loads(head[1:])
            pipe = self.redis.pipeline(transaction=False)
            for index in range(manifest["n"]):
                pipe.getex(self._chunk(key, index), ex=self.ttl_s)
            chunks = pipe.execute()
        if any(c is None for c in chunks):
            return None          # a chunk was evicted: recompute
        value = b"".join(chunks)
        if len(value) != manifest["size"] or hashlib.sha256(value).hexdigest() != manifest["sha256"]:
            return None          # torn write from a concurrent expiry/put: recompute
        return value

    def _count(self, result: str) -> None:
        if result == "hit":
            self.hits += 1
        else:
            self.misses += 1
        metrics.CACHE_REQUESTS.labels(result=result).inc()
        try:
            self.redis.hincrby(self.stats_key, result + "es" if result == "miss" else result + "s", 1)
        except (redis.ConnectionError, redis.TimeoutError):
            pass             # statistics are best-effort; the next real command reports the outage

    def _release(self, lock: redis.lock.Lock) -> None:
        try:
            lock.release()
        except LockError:
            pass             # expired or flushed meanwhile: nothing to release
        except (redis.ConnectionError, redis.TimeoutError):
            pass             # it expires on its own
