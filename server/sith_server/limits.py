"""Budgets a request may not exceed, and the counters that enforce them inside one server process.

The values live in :class:`sith_server.config.Limits` (environment, with defaults sized for one server);
this module holds the exception every budget raises and the small thread-safe counters the image
decoder and the interceptors share. Budgets are checked *before* the expensive work starts (header
sizes before decoding, a slot before a stream starts), so an over-budget call costs microseconds.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator

from sith_server.config import Limits

__all__ = ["BudgetExceeded", "CallEnded", "Limits", "Pool", "Slots", "check_call", "serving"]


class BudgetExceeded(RuntimeError):
    """A request (or the server as a whole) would exceed a configured budget.

    ``field`` names the request field or the resource (``images[3].encoded``, ``streams``), ``limit``
    the configured value; the service's error mapping turns it into RESOURCE_EXHAUSTED naming both.
    """

    def __init__(self, field: str, limit: int, reason: str) -> None:
        self.field = field
        self.limit = int(limit)
        self.reason = reason
        super().__init__(f"{field}: {reason} (limit {limit})")


class Slots:
    """Concurrency caps per key and overall (e.g. streams per tenant and in total); never blocks."""

    def __init__(self, total: int, per_key: int, what: str) -> None:
        self.total = total
        self.per_key = per_key
        self.what = what
        self._lock = threading.Lock()
        self._by_key: dict[str, int] = {}
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def acquire(self, key: str) -> None:
        """Take one slot for ``key`` or raise BudgetExceeded naming the cap that was hit."""
        with self._lock:
            if self._by_key.get(key, 0) >= self.per_key:
                raise BudgetExceeded(f"{self.what}_per_tenant", self.per_key,
                                     f"tenant {key!r} already has {self.per_key} open {self.what}; "
                                     "finish or cancel one first")
            if self._used >= self.total:
                raise BudgetExceeded(self.what, self.total, f"the server has {self.total} open {self.what}; "
                                     "retry shortly")
            self._by_key[key] = self._by_key.get(key, 0) + 1
            self._used += 1

    def release(self, key: str) -> None:
        with self._lock:
            left = self._by_key.get(key, 0) - 1
            if left > 0:
                self._by_key[key] = left
            else:
                self._by_key.pop(key, None)
            self._used = max(self._used - 1, 0)

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)


class Pool:
    """A quantity budget shared by concurrent requests (pixels being decoded): take ``n`` units,
    waiting at most ``wait_s`` for others to give theirs back, else BudgetExceeded."""

    def __init__(self, capacity: int, what: str, wait_s: float = 0.0) -> None:
        self.capacity = capacity
        self.what = what
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    @contextlib.contextmanager
    def take(self, n: int, field: str) -> Iterator[None]:
        if n > self.capacity:
            raise BudgetExceeded(field, self.capacity, f"needs {n:,} {self.what}, more than the server ever admits")
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self._used + n > self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BudgetExceeded(field, self.capacity, f"the server is busy with {self._used:,} {self.what} "
                                         "of other requests; retry shortly")
                self._cond.wait(remaining)
            self._used += n
        try:
            yield
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()


# ---- the call being served (set by sith_server.interceptors.CallGuard) ----------------------------

_CALL: contextvars.ContextVar[object | None] = contextvars.ContextVar("sith_call", default=None)


class CallEnded(RuntimeError):
    """The client cancelled the call or its deadline passed: stop the work, nobody reads the answer."""

    def __init__(self, why: str) -> None:
        self.why = why              # "cancelled" | "deadline_exceeded"
        super().__init__(f"call {why.replace('_', ' ')}; work stopped")


@contextlib.contextmanager
def serving(context: object) -> Iterator[None]:
    """Make ``context`` (a grpc.ServicerContext) the call that :func:`check_call` looks at."""
    token = _CALL.set(context)
    try:
        yield
    finally:
        _CALL.reset(token)


def check_call() -> None:
    """Raise CallEnded if the current call was cancelled or ran out of time (a no-op outside a call).

    Long in-process work (embedding many texts or images) calls this between batches, so a client
    that gives up stops costing CPU within one batch.
    """
    context = _CALL.get()
    if context is None:
        return
    if not context.is_active():                                   # type: ignore[attr-defined]
        remaining = context.time_remaining()                      # type: ignore[attr-defined]
        raise CallEnded("deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled")
    remaining = context.time_remaining()                          # type: ignore[attr-defined]
    if remaining is not None and remaining <= 0:
        raise CallEnded("deadline_exceeded")
