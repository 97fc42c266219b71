"""Server interceptors that keep one tenant (or an anonymous caller) from exhausting the server.

* :class:`Gate` (outermost) admits at most ``grpc_threads - reserved_threads`` API calls at a time.
  gRPC Python runs every call, health checks included, on one thread pool; a call that blocks (an
  unread stream waits for flow control, a hung dependency waits for its timeout) holds its thread.
  The gate counts the calls actually running on pool threads and turns the excess away at once with
  RESOURCE_EXHAUSTED, so ``reserved_threads`` threads are always free: health checks (exempt, they
  answer from memory) and the gate's own rejections, which take microseconds, run there. That is the
  capacity probes rely on, and no caller can take it. Reflection, the other service open without a
  token, is a bidirectional stream that holds a thread while idle: at most ``max_reflection_streams``.
* :class:`CallGuard` (innermost, after auth, inside the error interceptor) caps the calls one tenant
  may have running (``max_calls_per_tenant`` of the admitted ones) and the response streams that a
  client can hold open without reading (``DownloadEdit``) per tenant and overall
  (BudgetExceeded, which the error mapping turns into RESOURCE_EXHAUSTED), makes the call's context
  visible to long in-process work (``sith_server.limits.check_call``), and ends a call whose client
  went away or whose deadline passed with CANCELLED / DEADLINE_EXCEEDED (not an INTERNAL error).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from sith_server.auth import current_tenant
from sith_server.config import Limits
from sith_server.handlers import already_aborted, wrap
from sith_server.limits import BudgetExceeded, CallEnded, Slots, serving

DOMAIN = "sith.v1"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
# Open to callers without a token and able to hold a thread (a bidi stream that waits for requests).
ANONYMOUS_STREAMS = "/grpc.reflection."
# Response streams a client can keep open without reading (each holds a thread while blocked).
CAPPED_STREAMS = ("/DownloadEdit",)


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status(code: int, message: str, *details) -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[_pack(d) for d in details]))


def _retry(seconds: float) -> error_details_pb2.RetryInfo:
    whole = int(seconds)
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
        seconds=whole, nanos=int((seconds - whole) * 1e9)))


def ended_status(exc: CallEnded) -> grpc.Status:
    """DEADLINE_EXCEEDED or CANCELLED for a call whose work was stopped (never INTERNAL)."""
    code = code_pb2.DEADLINE_EXCEEDED if exc.why == "deadline_exceeded" else code_pb2.CANCELLED
    return _status(code, str(exc))


class Gate(grpc.ServerInterceptor):
    """At most ``capacity`` non-exempt calls on pool threads; the rest are rejected immediately."""

    def __init__(self, capacity: int, on_reject: Callable[[str], None] | None = None,
                 exempt: Iterable[str] = EXEMPT_PREFIXES, anonymous_streams: int = 2) -> None:
        self.capacity = capacity
        self._exempt = tuple(exempt)
        self._lock = threading.Lock()
        self._running = 0
        # Reflection needs no token, so callers without one could otherwise fill the gate with idle streams.
        self.anonymous = Slots(anonymous_streams, anonymous_streams + 1, "reflection streams")
        self._on_reject = on_reject or (lambda reason: None)

    @classmethod
    def from_limits(cls, limits: Limits, on_reject: Callable[[str], None] | None = None) -> Gate:
        return cls(limits.grpc_threads - limits.reserved_threads, on_reject,
                   anonymous_streams=limits.max_reflection_streams)

    @property
    def running(self) -> int:
        return self._running

    def _enter(self) -> bool:
        with self._lock:
            if self._running >= self.capacity:
                return False
            self._running += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._running -= 1

    def _busy(self, context: grpc.ServicerContext) -> None:
        self._on_reject("busy")
        context.abort_with_status(_status(
            code_pb2.RESOURCE_EXHAUSTED, f"the server is at its limit of {self.capacity} concurrent calls; "
            "retry shortly", error_details_pb2.ErrorInfo(reason="SERVER_BUSY", domain=DOMAIN,
                                                         metadata={"limit": str(self.capacity)}), _retry(1.0)))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if method.startswith(self._exempt):
            return handler
        anonymous = method.startswith(ANONYMOUS_STREAMS)

        def around(call, request, context):
            if not self._enter():
                self._busy(context)
            try:
                return call(request, context)
            finally:
                self._leave()

        def around_stream(call, request, context):
            if anonymous:
                try:
                    self.anonymous.acquire("")
                except BudgetExceeded as exc:
                    self._on_reject("reflection_streams")
                    context.abort_with_status(_status(code_pb2.RESOURCE_EXHAUSTED, exc.reason, _retry(1.0)))
            try:
                if not self._enter():
                    self._busy(context)
                try:
                    yield from call(request, context)
                finally:
                    self._leave()
            finally:
                if anonymous:
                    self.anonymous.release("")

        return wrap(handler, around, around_stream)


class CallGuard(grpc.ServerInterceptor):
    """Stream caps per tenant and overall, the call's context for ``check_call``, ended calls.

    Place it after auth (it reads the tenant) and inside the error interceptor (which maps the
    BudgetExceeded of a stream cap).
    """

    def __init__(self, limits: Limits, on_reject: Callable[[str], None] | None = None) -> None:
        self.streams = Slots(limits.max_streams, limits.max_streams_per_tenant, "streams")
        # The gate bounds all calls; this keeps one tenant from taking every admitted call.
        admitted = limits.grpc_threads - limits.reserved_threads
        self.calls = Slots(admitted, limits.max_calls_per_tenant, "calls")
        self._on_reject = on_reject or (lambda reason: None)

    def _take(self, slots: Slots, tenant: str) -> None:
        try:
            slots.acquire(tenant)
        except BudgetExceeded as exc:
            self._on_reject(exc.field)
            raise

    @staticmethod
    def _ended(context: grpc.ServicerContext, exc: CallEnded) -> None:
        if already_aborted(context):
            raise exc
        context.abort_with_status(ended_status(exc))

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        capped = method.endswith(CAPPED_STREAMS)
        # Health checks never count (they are the probes' reserve); reflection has its own cap in the gate.
        counted = not method.startswith((ANONYMOUS_STREAMS, *EXEMPT_PREFIXES))

        def around(call, request, context):
            tenant = current_tenant()
            if counted:
                self._take(self.calls, tenant)
            try:
                with serving(context):
                    return call(request, context)
            except CallEnded as exc:
                self._ended(context, exc)
            finally:
                if counted:
                    self.calls.release(tenant)

        def around_stream(call, request, context):
            tenant = current_tenant()
            if counted:
                self._take(self.calls, tenant)
            try:
                if capped:
                    self._take(self.streams, tenant)
                try:
                    with serving(context):
                        yield from call(request, context)
                except CallEnded as exc:
                    self._ended(context, exc)
                finally:
                    if capped:
                        self.streams.release(tenant)
            finally:
                if counted:
                    self.calls.release(tenant)

        return wrap(continuation(handler_call_details), around, around_stream)
