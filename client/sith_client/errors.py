"""Typed exceptions for every way a SITH call can fail.

gRPC reports failures as a status code plus, in the ``grpc-status-details-bin`` trailer, a
``google.rpc.Status`` whose details say *what* was wrong (which field, which resource, when to
retry). Callers ``except sith_client.InvalidArgument as e: e.field, e.suggestions``: the fields
come from google.rpc.BadRequest and the close matches from sith.v1.Suggestions details, as data
(never parsed out of a message). The SDK raises the same classes for requests it rejects before
sending (bounds from the proto, ``sith_api.bounds``), so a caller handles both alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from sith_api.bounds import BoundsError
from sith_api.v1 import sith_pb2 as pb

__all__ = [
    "SithError",
    "FieldViolation",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
    "JobFailed",
    "ChecksumMismatch",
    "from_rpc_error",
    "from_status",
    "invalid_argument",
]


@dataclass(frozen=True)
class FieldViolation:
    """One bad input field (``google.rpc.BadRequest.FieldViolation``) with close matches, if any."""

    field: str
    description: str
    reason: str = ""
    suggestions: tuple[str, ...] = ()


class SithError(Exception):
    """Base class of every SDK error; ``code`` is the gRPC status code (None for local errors)."""

    code: grpc.StatusCode | None = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: list[Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: list[Any] = list(details or [])

    def detail(self, kind: type) -> Any | None:
        """The first unpacked detail message of a given protobuf type, e.g. ``ResourceInfo``."""
        return next((d for d in self.details if isinstance(d, kind)), None)

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        return self.detail(error_details_pb2.ErrorInfo)

    @property
    def suggestions(self) -> list[str]:
        """Close matches the server offered (e.g. model or concept names near a misspelt one)."""
        out: dict[str, None] = {}
        for d in self.details:
            if isinstance(d, pb.Suggestions):
                out.update(dict.fromkeys(d.values))
        return list(out)

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked clients to wait before retrying (``google.rpc.RetryInfo``)."""
        r = self.detail(error_details_pb2.RetryInfo)
        return r.retry_delay.ToTimedelta().total_seconds() if r else None

    @property
    def help_links(self) -> list[tuple[str, str]]:
        """(description, url) pairs from a ``google.rpc.Help`` detail."""
        h = self.detail(error_details_pb2.Help)
        return [(link.description, link.url) for link in h.links] if h else []

    def __str__(self) -> str:
        name = self.code.name if self.code is not None else type(self).__name__
        return f"{name}: {self.message}"


class Cancelled(SithError):
    code = grpc.StatusCode.CANCELLED


class Unknown(SithError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(SithError):
    """Bad input. ``field_violations`` names each bad field; ``suggestions`` are close matches
    (e.g. dictionary concepts near a misspelt one) across all of them."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field_violations(self) -> list[FieldViolation]:
        by_field = {d.field: tuple(d.values) for d in self.details if isinstance(d, pb.Suggestions)}
        out: list[FieldViolation] = []
        for d in self.details:
            if isinstance(d, error_details_pb2.BadRequest):
                for v in d.field_violations:
                    out.append(FieldViolation(v.field, v.description, v.reason, by_field.get(v.field, ())))
        return out

    @property
    def field(self) -> str | None:
        """The first offending field, the common single-field case."""
        fv = self.field_violations
        return fv[0].field if fv else None

    def __str__(self) -> str:
        base = super().__str__()
        sugg = self.suggestions
        return f"{base} (did you mean: {', '.join(sugg)}?)" if sugg else base


class DeadlineExceeded(SithError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(SithError):
    """An unknown model, edit or operation: ``resource`` is its name (e.g. "tenants/t/edits/…"),
    ``resource_type`` what it is ("model", "edit", "operation"); ``suggestions`` are close matches."""

    code = grpc.StatusCode.NOT_FOUND

    @property
    def resource(self) -> str:
        info = self.detail(error_details_pb2.ResourceInfo)
        return info.resource_name if info else ""

    @property
    def resource_type(self) -> str:
        info = self.detail(error_details_pb2.ResourceInfo)
        return info.resource_type if info else ""


class AlreadyExists(SithError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(SithError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SithError):
    """Quota or queue full; see ``retry_after``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED



class FailedPrecondition(SithError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SithError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(SithError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(SithError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(SithError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(SithError):
    """The server could not be reached (or its Redis is down) even after retries."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, attempts: int = 1, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.attempts = attempts

    def __str__(self) -> str:
        s = super().__str__()
        return f"{s} (after {self.attempts} attempts)" if self.attempts > 1 else s


class DataLoss(SithError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(SithError):
    """Missing or wrong bearer token: pass ``token=`` or set ``SITH_TOKEN``."""

    code = grpc.StatusCode.UNAUTHENTICATED


class JobFailed(SithError):
    """A long-running operation (or the planning job of an edit) failed or was cancelled.

    Build it with :meth:`create`: the instance is *also* of the job's error type, so an unknown
    concept found by a worker can be caught as ``InvalidArgument`` just like one the server
    rejected up front (``except JobFailed`` still catches every job failure). ``cause`` is that
    typed error; ``operation`` names the job.
    """

    def __init__(self, message: str, *, operation: str = "", cause: SithError | None = None) -> None:
        super().__init__(message, code=cause.code if cause else None, details=cause.details if cause else None)
        self.operation = operation
        self.cause = cause

    @classmethod
    def create(cls, message: str, *, operation: str = "", cause: SithError | None = None) -> JobFailed:
        if cause is None or isinstance(cause, JobFailed) or type(cause) is SithError:
            return cls(message, operation=operation, cause=cause)
        kind = _JOB_FAILED_TYPES.get(type(cause))
        if kind is None:
            kind = type(f"JobFailed{type(cause).__name__}", (cls, type(cause)), {"__module__": __name__})
            _JOB_FAILED_TYPES[type(cause)] = kind
        return kind(message, operation=operation, cause=cause)


_JOB_FAILED_TYPES: dict[type, type[JobFailed]] = {}


class ChecksumMismatch(SithError):
    """A downloaded checkpoint's sha256 or size differs from what the server announced."""

    code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[SithError]] = {
    cls.code: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
_DETAIL_TYPES = [
    error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo, error_details_pb2.Help, error_details_pb2.DebugInfo,
    error_details_pb2.QuotaFailure, error_details_pb2.PreconditionFailure,
    error_details_pb2.RequestInfo, error_details_pb2.LocalizedMessage, pb.Suggestions,
]


def _unpack(details: list[any_pb2.Any]) -> list[Any]:
    out: list[Any] = []
    for d in details:
        for kind in _DETAIL_TYPES:
            if d.Is(kind.DESCRIPTOR):
                msg = kind()
                d.Unpack(msg)
                out.append(msg)
                break
        else:
            out.append(d)  # unknown detail type: keep the Any so nothing is lost
    return out


def from_status(status: status_pb2.Status, *, attempts: int = 1) -> SithError:
    """Build the typed exception for a ``google.rpc.Status`` (e.g. an Operation's error)."""
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    return _make(code, status.message, _unpack(list(status.details)), attempts)


def from_rpc_error(err: grpc.RpcError, *, attempts: int = 1) -> SithError:
    """Build the typed exception for a failed call, reading rich details from its trailers."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    details: list[Any] = []
    try:
        status = _status_from_trailers(err)
    except Exception:  # malformed trailer: fall back to code + message
        status = None
    if status is not None:
        message = status.message or message
        details = _unpack(list(status.details))
    return _make(code, message or "", details, attempts)


def _status_from_trailers(err: grpc.RpcError) -> status_pb2.Status | None:
    """Parse ``grpc-status-details-bin`` directly; works for sync and asyncio errors alike."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            return status
    return None


def _make(code: grpc.StatusCode, message: str, details: list[Any], attempts: int) -> SithError:
    cls = _BY_CODE.get(code, SithError)
    if cls is Unavailable:
        return Unavailable(message, attempts=attempts, details=details)
    return cls(message, code=code, details=details)


def invalid_argument(field: str, reason: str) -> InvalidArgument:
    """The InvalidArgument the SDK raises for a request it rejects before sending (same details
    as the server's: google.rpc.BadRequest + ErrorInfo)."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=reason, reason="INVALID_FIELD")
    info = error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="sith.v1", metadata={"field": field})
    return InvalidArgument(f"{field}: {reason}", details=[error_details_pb2.BadRequest(field_violations=[violation]),
                                                          info])


def from_bounds(exc: BoundsError) -> InvalidArgument:
    """A ``sith_api.bounds`` rejection as the SDK's InvalidArgument (every bad field listed)."""
    err = invalid_argument(exc.field, exc.reason)
    err.details[0] = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.reason, reason="INVALID_FIELD")
        for v in exc.violations])
    return err


