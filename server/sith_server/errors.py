"""Exceptions to gRPC status with google.rpc details, so clients get typed, actionable errors.

Servicers raise plain Python errors (the engine's InvalidInput, a request outside the proto's
declared bounds, NotFound, FailedPrecondition, quota and budget errors, RedisUnavailable);
:func:`to_status` turns each into a ``grpc.Status`` whose trailers carry a ``google.rpc.Status``
built by the same functions the workers use for failed jobs (``sith_workers.errors``), so a bad
field reads the same whether the server or a worker found it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from sith.engine.errors import InvalidInput
from sith_api import bounds
from sith_api.bounds import BoundsError
from sith_api.v1 import sith_pb2 as pb
from sith_server.limits import BudgetExceeded
from sith_workers import errors as shared
from sith_workers.connection import RedisUnavailable
from sith_workers.queue import QuotaExceeded

DOMAIN = shared.DOMAIN
log = logging.getLogger(__name__)


class NotFound(LookupError):
    """A named resource (model, edit, operation) does not exist for this tenant."""

    def __init__(self, resource_type: str, name: str, suggestions: Sequence[str] = (), field: str = "") -> None:
        self.resource_type = resource_type
        self.name = name
        self.suggestions = list(suggestions)
        self.field = field or resource_type
        super().__init__(f"{resource_type} {name!r} not found")


class FailedPrecondition(RuntimeError):
    """The resource exists but is not in a state that allows the call (e.g. edit not ready)."""

    def __init__(self, subject: str, description: str) -> None:
        self.subject = subject
        self.description = description
        super().__init__(f"{subject}: {description}")


class ResourceExhausted(RuntimeError):
    """A server-side limit was hit (e.g. too many open watch streams); retry later."""


class Unavailable(RuntimeError):
    """A dependency (Redis, the model runtime) is down; the client may retry."""


def _grpc(status: status_pb2.Status) -> grpc.Status:
    return rpc_status.to_status(status)


def not_found(exc: NotFound) -> status_pb2.Status:
    resource = error_details_pb2.ResourceInfo(resource_type=exc.resource_type, resource_name=exc.name,
                                              description=str(exc))
    details: list = [resource, error_details_pb2.ErrorInfo(reason="NOT_FOUND", domain=DOMAIN,
                                                           metadata={"resource_type": exc.resource_type})]
    if exc.suggestions:
        details.append(pb.Suggestions(field=exc.field, values=exc.suggestions))
    return status_pb2.Status(code=code_pb2.NOT_FOUND, message=str(exc), details=shared.pack(*details))


def status_of(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for any exception a servicer raises (INTERNAL for the unexpected)."""
    if isinstance(exc, InvalidInput):
        return shared.invalid_argument(exc.field, exc.reason, exc.suggestions)
    if isinstance(exc, BoundsError):
        status = shared.invalid_argument(exc.field, exc.reason)
        if len(exc.violations) > 1:    # every bad field, not only the first
            bad = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.reason, reason="INVALID_FIELD")
                for v in exc.violations])
            status.details[0].Pack(bad)
        return status
    if isinstance(exc, NotFound):
        return not_found(exc)
    if isinstance(exc, FailedPrecondition):
        violation = error_details_pb2.PreconditionFailure.Violation(
            type="STATE", subject=exc.subject, description=exc.description)
        return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(exc),
                                 details=shared.pack(error_details_pb2.PreconditionFailure(violations=[violation])))
    if isinstance(exc, QuotaExceeded):
        return shared.resource_exhausted(exc.resource, exc.limit, str(exc), subject=f"tenant:{exc.tenant}")
    if isinstance(exc, BudgetExceeded):
        return shared.resource_exhausted(exc.field, exc.limit, str(exc))
    if isinstance(exc, (RedisUnavailable, Unavailable, ResourceExhausted)):
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
        code = code_pb2.RESOURCE_EXHAUSTED if isinstance(exc, ResourceExhausted) else code_pb2.UNAVAILABLE
        return status_pb2.Status(code=code, message=str(exc), details=shared.pack(retry))
    log.exception("internal error", exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {type(exc).__name__}")


def to_status(exc: BaseException) -> grpc.Status:
    """:func:`status_of` as the ``grpc.Status`` a servicer aborts with."""
    return _grpc(status_of(exc))


def _check_bounds(request: object) -> None:
    """Unary requests are messages; streaming requests (reflection) are iterators and pass as is."""
    if isinstance(request, Message):
        bounds.check(request)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Checks every request against the proto's bounds, and maps exceptions escaping a servicer (unary or mid-stream) to rich statuses via :func:`to_status`."""

    def intercept_service(self, continuation, handler_call_details):
        from sith_server.handlers import already_aborted, wrap

        def around(call, request, context):
            try:
                _check_bounds(request)      # the proto's declared limits, once, for every call
                return call(request, context)
            except Exception as exc:
                if already_aborted(context):
                    raise
                context.abort_with_status(to_status(exc))

        def around_stream(call, request, context):
            try:
                _check_bounds(request)
                yield from call(request, context)
            except Exception as exc:
                if already_aborted(context):
                    raise
                context.abort_with_status(to_status(exc))

        return wrap(continuation(handler_call_details), around, around_stream)
