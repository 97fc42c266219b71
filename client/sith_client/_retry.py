"""Retry with capped exponential backoff and full jitter, for sync and asyncio calls.

Only transient codes are retried (UNAVAILABLE by default: server restarting, Redis blip, nothing
listening yet). Calls that create something are retried only when the caller marks them
idempotent, because a create whose response was lost may already have happened.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from .errors import from_rpc_error

T = TypeVar("T")

__all__ = ["RetryPolicy", "NO_RETRY", "call_with_retry", "acall_with_retry"]


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how patiently to retry a transient failure.

    The n-th retry sleeps ``uniform(0, min(max_backoff, initial_backoff * multiplier**n))``
    ("full jitter"), which spreads a thundering herd of clients after a server restart.
    """

    max_attempts: int = 4                   # total tries, including the first
    initial_backoff: float = 0.1            # seconds
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: bool = True
    codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The sleeps between attempts (``max_attempts - 1`` of them)."""
        uniform = rng.uniform if rng is not None else random.uniform
        for n in range(self.max_attempts - 1):
            cap = min(self.max_backoff, self.initial_backoff * self.multiplier**n)
            yield uniform(0, cap) if self.jitter else cap

    def retryable(self, err: grpc.RpcError) -> bool:
        return hasattr(err, "code") and err.code() in self.codes

    def honour_hint(self, delay: float, err: grpc.RpcError) -> float:
        """Wait at least what the server's ``RetryInfo`` asks (capped at ``max_backoff``)."""
        hint = _retry_after(err)
        return max(delay, min(hint, self.max_backoff)) if hint else delay


NO_RETRY = RetryPolicy(max_attempts=1)


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    idempotent: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run ``fn``; on a retryable ``grpc.RpcError`` back off and try again; raise a ``SithError``."""
    delays = policy.delays(rng) if idempotent else iter(())
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except grpc.RpcError as err:
            if policy.retryable(err):
                delay = next(delays, None)
                if delay is not None:
                    sleep(policy.honour_hint(delay, err))
                    continue
            raise from_rpc_error(err, attempts=attempt) from None


async def acall_with_retry(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    idempotent: bool = True,
    rng: random.Random | None = None,
) -> T:
    """Asyncio twin of :func:`call_with_retry`."""
    delays = policy.delays(rng) if idempotent else iter(())
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except grpc.RpcError as err:
            if policy.retryable(err):
                delay = next(delays, None)
                if delay is not None:
                    await asyncio.sleep(policy.honour_hint(delay, err))
                    continue
            raise from_rpc_error(err, attempts=attempt) from None


def _retry_after(err: grpc.RpcError) -> float | None:
    """The ``RetryInfo`` delay in the error's rich status, if the server sent one."""
    try:
        return from_rpc_error(err).retry_after
    except Exception:  # no or unreadable trailers: no hint
        return None
