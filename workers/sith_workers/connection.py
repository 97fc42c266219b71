"""Redis clients that fail fast, and the one exception an outage turns into.

redis-py's defaults retry with exponential backoff, so an unreachable Redis can stall a request for
many seconds. Every service component builds its client here instead: short connect/read timeouts,
one quick retry, and :class:`RedisUnavailable` (the server maps it to gRPC UNAVAILABLE).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

# Connection-level failures only; a reply error (wrong type, NOGROUP, ...) is a bug, not an outage.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)


class RedisUnavailable(RuntimeError):
    """Redis could not be reached or did not answer in time (maps to gRPC UNAVAILABLE)."""


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
        health_check_interval=30,
    )


def describe(client: redis.Redis) -> str:
    """host:port/db (or the socket path) of a client, for error messages; never the password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


@contextlib.contextmanager
def outage_as_unavailable(client: redis.Redis) -> Iterator[None]:
    """Re-raise connection failures as :class:`RedisUnavailable` naming the Redis address."""
    try:
        yield
    except OUTAGE_ERRORS as exc:
        raise RedisUnavailable(f"Redis at {describe(client)} is unavailable: {exc}") from exc
