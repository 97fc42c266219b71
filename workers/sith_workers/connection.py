"""Redis clients that fail fast, and the exceptions an outage or a full Redis turns into.

redis-py's defaults retry with exponential backoff, so an unreachable Redis can stall a request for
many seconds. Every service component builds its client here instead: short connect/read timeouts,
one quick retry, and :class:`RedisUnavailable` (the server maps it to gRPC UNAVAILABLE).

A *hung* Redis (SIGSTOP, a stuck fork, a full network buffer) still accepts TCP connections, so only
the read timeout notices it. API calls therefore use :func:`connect_api`: a sub-second read timeout,
no retry and a health check on idle connections, so a call fails with UNAVAILABLE in under a second
(the server's only blocking read, XREAD of job events, blocks for less than that timeout).
A full Redis (``maxmemory`` reached with nothing evictable) answers writes with an OOM error:
:class:`RedisFull`, also retryable, never an INTERNAL error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

# Connection-level failures only; a reply error (wrong type, NOGROUP, ...) is a bug, not an outage.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)


# A call on a hung Redis gives up after this many seconds (the target is 1 s to UNAVAILABLE).
API_SOCKET_TIMEOUT_S = 0.75
API_CONNECT_TIMEOUT_S = 0.5
# Blocking reads of API calls (XREAD of job events) must return well within API_SOCKET_TIMEOUT_S.
API_BLOCK_MS = 250
HEALTH_CHECK_INTERVAL_S = 10


class RedisUnavailable(RuntimeError):
    """Redis could not be reached or did not answer in time (maps to gRPC UNAVAILABLE)."""


class RedisFull(RedisUnavailable):
    """Redis refused a write because ``maxmemory`` is reached and nothing is evictable.

    Retryable (the GC, TTLs or an operator free memory); a subclass of RedisUnavailable so every
    mapping of outages (gRPC UNAVAILABLE + RetryInfo, workers backing off) covers it too.
    """


def connect(
    url: str,
    *,
    socket_timeout: float = 10.0,
    connect_timeout: float = 2.0,
    retries: int = 1,
) -> redis.Redis:
    """A bytes-mode client for ``url`` with bounded timeouts (never hangs on an outage).

    ``socket_timeout`` must exceed the longest blocking read the caller issues (workers block
    on XREADGROUP for about a second at a time).
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ConstantBackoff(0.05), retries),
        retry_on_error=list(OUTAGE_ERRORS),
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


def connect_api(url: str) -> redis.Redis:
    """The server's client: a hung Redis becomes RedisUnavailable within ~API_SOCKET_TIMEOUT_S."""
    return connect(url, socket_timeout=API_SOCKET_TIMEOUT_S, connect_timeout=API_CONNECT_TIMEOUT_S, retries=0)


def describe(client: redis.Redis) -> str:
    """host:port/db (or the socket path) of a client, for error messages; never the password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


@contextlib.contextmanager
def outage_as_unavailable(client: redis.Redis) -> Iterator[None]:
    """Re-raise connection failures as :class:`RedisUnavailable` and a full Redis as :class:`RedisFull`,
    naming the Redis address."""
    try:
        yield
    except OUTAGE_ERRORS as exc:
        raise RedisUnavailable(f"Redis at {describe(client)} is unavailable: {exc}") from exc
    except redis.OutOfMemoryError as exc:
        raise RedisFull(f"Redis at {describe(client)} is full (maxmemory reached and nothing evictable); "
                        f"retry later: {exc}") from exc
    except redis.ResponseError as exc:
        if "OOM" in str(exc)[:8]:        # OOM errors raised from inside Lua scripts arrive as plain replies
            raise RedisFull(f"Redis at {describe(client)} is full (maxmemory reached and nothing evictable); "
                            f"retry later: {exc}") from exc
        raise
