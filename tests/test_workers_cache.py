"""RedisArtifactCache against the real Redis: hits, TTL, chunking, single-flight, outages."""

from __future__ import annotations

import threading
import time

import pytest

from sith.engine.cache import ArtifactCache
from sith_workers.cache import RedisArtifactCache
from sith_workers.connection import RedisUnavailable, connect
from sith_workers.embedded import free_port
from sith_workers.queue import JobQueue


def test_hit_path_ttl_and_stats(shared, prefix):
    cache = RedisArtifactCache(shared, prefix, ttl_s=300)
    assert isinstance(cache, ArtifactCache)
    assert cache.get("decomposition/abc/L3/h0") is None
    cache.put("decomposition/abc/L3/h0", b"\x00tensor bytes")
    assert cache.get("decomposition/abc/L3/h0") == b"\x00tensor bytes"
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.stats() == {"hits": 1, "misses": 1}
    assert 0 < shared.ttl(cache.key("decomposition/abc/L3/h0")) <= 300


def test_large_values_are_chunked_and_a_lost_chunk_is_a_miss(shared, prefix):
    cache = RedisArtifactCache(shared, prefix, chunk_bytes=1000)
    value = bytes(range(256)) * 20                                  # 5120 bytes -> 6 chunks
    cache.put("dictionary/x", value)
    assert len(shared.get(cache.key("dictionary/x"))) < 200        # the head is a small manifest
    assert cache.get("dictionary/x") == value
    shared.delete(cache.key("dictionary/x") + "#3")                # as if evicted
    assert cache.get("dictionary/x") is None


def test_two_concurrent_identical_requests_compute_once(shared, prefix):
    computations = []
    results = []

    def request() -> None:
        cache = RedisArtifactCache(connect(_url(shared)), prefix)

        def compute() -> bytes:
            computations.append(threading.get_ident())
            time.sleep(0.5)
            return b"svd"

        results.append(cache.get_or_compute("decomposition/m/L0", compute))

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [b"svd", b"svd"]
    assert len(computations) == 1


def test_failed_computation_releases_the_key(shared, prefix):
    cache = RedisArtifactCache(shared, prefix, wait_timeout_s=5)
    with pytest.raises(ValueError):
        cache.get_or_compute("k", lambda: (_ for _ in ()).throw(ValueError("bad")))
    other = RedisArtifactCache(connect(_url(shared)), prefix, wait_timeout_s=5)
    start = time.monotonic()
    assert other.get_or_compute("k", lambda: b"ok") == b"ok"
    assert time.monotonic() - start < 1.0                          # nobody waited for a stale lock


def test_flushed_cache_means_recomputation(own_redis):
    client = connect(own_redis.url)
    cache = RedisArtifactCache(client, "sith")
    calls = []
    compute = lambda: calls.append(1) or b"v"  # noqa: E731
    assert cache.get_or_compute("k", compute) == b"v"
    assert cache.get_or_compute("k", compute) == b"v"
    client.flushdb()
    assert cache.get_or_compute("k", compute) == b"v"
    assert len(calls) == 2


def test_unreachable_redis_fails_fast_and_clearly():
    url = f"redis://127.0.0.1:{free_port()}/0"                     # nothing listens there
    client = connect(url)
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"127\.0\.0\.1:\d+/0 is unavailable"):
        RedisArtifactCache(client).get("k")
    with pytest.raises(RedisUnavailable):
        JobQueue(client).submit("explain", {}, tenant="t")
    assert time.monotonic() - start < 5.0


def _url(client) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_held_locks_live_while_extended_and_expire_when_the_holder_dies(shared, prefix):
    holder = RedisArtifactCache(shared, prefix, lock_timeout_s=0.5)
    assert holder.get("k") is None                                 # miss: holder now computes "k"
    lock_key = f"{prefix}:lock:k"
    for _ in range(3):                                             # 0.9 s > timeout, kept alive
        time.sleep(0.3)
        holder.extend_locks()
        assert shared.pttl(lock_key) > 0
    # the holder "dies" (no more extensions): a waiter gets the key once the lock expires
    waiter = RedisArtifactCache(connect(_url(shared)), prefix, wait_timeout_s=5)
    start = time.monotonic()
    assert waiter.get_or_compute("k", lambda: b"v") == b"v"
    assert 0.2 < time.monotonic() - start < 2.0
