"""Exceptions to gRPC status with google.rpc details, so clients get typed, actionable errors.

Servicers raise plain Python errors (the engine's InvalidInput, NotFound, FailedPrecondition,
sith_workers.RedisUnavailable); :func:`to_status` turns each into a ``grpc.Status`` whose trailers
carry a ``google.rpc.Status`` (read it with ``grpc_status.rpc_status.from_call``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from sith.engine.errors import InvalidInput
from sith_workers.connection import RedisUnavailable

DOMAIN = "sith.v1"
log = logging.getLogger(__name__)


class NotFound(LookupError):
    """A named resource (model, edit, operation) does not exist for this tenant."""

    def __init__(self, resource_type: str, name: str, suggestions: Sequence[str] = ()) -> None:
        self.resource_type = resource_type
        self.name = name
        self.suggestions = list(suggestions)
        message = f"{resource_type} {name!r} not found"
        if self.suggestions:
            message += f" (did you mean: {', '.join(self.suggestions)}?)"
        super().__init__(message)


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


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status(code: int, message: str, *details) -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(code=code, message=message,
                                                  details=[_pack(d) for d in details]))


def invalid_argument(exc: InvalidInput) -> grpc.Status:
    description = exc.reason
    if exc.suggestions:
        description += f" (did you mean: {', '.join(exc.suggestions)}?)"
    violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=description)
    info = error_details_pb2.ErrorInfo(
        reason="UNKNOWN_VALUE" if exc.suggestions else "INVALID_FIELD", domain=DOMAIN,
        metadata={"field": exc.field, **({"suggestions": ",".join(exc.suggestions)} if exc.suggestions else {})})
    return _status(code_pb2.INVALID_ARGUMENT, str(exc),
                   error_details_pb2.BadRequest(field_violations=[violation]), info)


def not_found(exc: NotFound) -> grpc.Status:
    resource = error_details_pb2.ResourceInfo(resource_type=exc.resource_type, resource_name=exc.name,
                                              description=str(exc))
    details: list = [resource]
    if exc.suggestions:
        details.append(error_details_pb2.ErrorInfo(reason="NOT_FOUND", domain=DOMAIN,
                                                    metadata={"suggestions": ",".join(exc.suggestions)}))
    return _status(code_pb2.NOT_FOUND, str(exc), *details)


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status for any exception a servicer raises (INTERNAL for the unexpected)."""
    if isinstance(exc, InvalidInput):
        return invalid_argument(exc)
    if isinstance(exc, NotFound):
        return not_found(exc)
    if isinstance(exc, FailedPrecondition):
        violation = error_details_pb2.PreconditionFailure.Violation(
            type="STATE", subject=exc.subject, description=exc.description)
        return _status(code_pb2.FAILED_PRECONDITION, str(exc),
                       error_details_pb2.PreconditionFailure(violations=[violation]))
    if isinstance(exc, (RedisUnavailable, Unavailable, ResourceExhausted)):
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
        code = code_pb2.RESOURCE_EXHAUSTED if isinstance(exc, ResourceExhausted) else code_pb2.UNAVAILABLE
        return _status(code, str(exc), retry)
    log.exception("internal error", exc_info=exc)
    return _status(code_pb2.INTERNAL, f"internal error: {type(exc).__name__}")


def status_proto(code: int, message: str) -> status_pb2.Status:
    """A bare google.rpc.Status (used in Operation.error)."""
    return status_pb2.Status(code=code, message=message)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions escaping a servicer (unary or mid-stream) to rich statuses via :func:`to_status`."""

    def intercept_service(self, continuation, handler_call_details):
        from sith_server.handlers import already_aborted, wrap

        def around(call, request, context):
            try:
                return call(request, context)
            except Exception as exc:
                if already_aborted(context):
                    raise
                context.abort_with_status(to_status(exc))

        def around_stream(call, request, context):
            try:
                yield from call(request, context)
            except Exception as exc:
                if already_aborted(context):
                    raise
                context.abort_with_status(to_status(exc))

        return wrap(continuation(handler_call_details), around, around_stream)
