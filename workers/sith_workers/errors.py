"""One mapping from errors to google.rpc.Status, shared by the server (calls) and the workers (jobs).

A failed job stores its error as data (``{"code", "reason", "field"?, "suggestions"?}``, the form
``sith_workers.queue.encode_error`` writes, ``code`` a google.rpc.Code name in lower case); the
server and the edit store turn that into the same ``google.rpc.Status`` a call would have failed
with: INVALID_ARGUMENT carries google.rpc.BadRequest + ErrorInfo + sith.v1.Suggestions (close
matches as a list, never joined into prose).
"""

from __future__ import annotations

from collections.abc import Sequence
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from sith_api.v1 import sith_pb2 as pb

DOMAIN = "sith.v1"


def pack(*messages) -> list[any_pb2.Any]:
    out = []
    for message in messages:
        packed = any_pb2.Any()
        packed.Pack(message)
        out.append(packed)
    return out


def invalid_argument(field: str, reason: str, suggestions: Sequence[str] = ()) -> status_pb2.Status:
    """INVALID_ARGUMENT naming ``field``; suggestions travel as a sith.v1.Suggestions detail."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=reason,
                                                            reason="UNKNOWN_VALUE" if suggestions else "INVALID_FIELD")
    info = error_details_pb2.ErrorInfo(reason=violation.reason, domain=DOMAIN, metadata={"field": field})
    details: list = [error_details_pb2.BadRequest(field_violations=[violation]), info]
    if suggestions:
        details.append(pb.Suggestions(field=field, values=list(suggestions)))
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {reason}", details=pack(*details))


def resource_exhausted(resource: str, limit: int, description: str, subject: str = "") -> status_pb2.Status:
    """RESOURCE_EXHAUSTED naming the limit (google.rpc.QuotaFailure) and when to retry."""
    from google.protobuf import duration_pb2

    violation = error_details_pb2.QuotaFailure.Violation(subject=subject or resource, description=description)
    info = error_details_pb2.ErrorInfo(reason="LIMIT_EXCEEDED", domain=DOMAIN,
                                       metadata={"resource": resource, "limit": str(limit)})
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
    return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=description,
                             details=pack(error_details_pb2.QuotaFailure(violations=[violation]), info, retry))


def job_status(error: dict | None, state: str) -> status_pb2.Status:
    """The google.rpc.Status of a failed or cancelled job."""
    if state == "cancelled":
        return status_pb2.Status(code=code_pb2.CANCELLED, message="the operation was cancelled")
    error = error or {}
    name = str(error.get("code", "internal")).upper()
    code = code_pb2.Code.Value(name) if name in code_pb2.Code.keys() else code_pb2.INTERNAL
    reason = str(error.get("reason", "the job failed"))
    if code == code_pb2.INVALID_ARGUMENT and error.get("field"):
        return invalid_argument(str(error["field"]), reason, [str(s) for s in error.get("suggestions") or ()])
    if code == code_pb2.RESOURCE_EXHAUSTED:
        return resource_exhausted(str(error.get("field") or "job"), int(error.get("limit", 0) or 0), reason)
    return status_pb2.Status(code=code, message=reason)
