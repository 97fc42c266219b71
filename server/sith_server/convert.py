"""Job records -> sith.v1.Operation, and the few tensor/time conversions the servicers share.

A job's result is already a sith.v1 message (stored by the worker as a google.protobuf.Any in its
canonical JSON form), so turning a record into an Operation copies it, never reshapes it.
"""

from __future__ import annotations

import numpy as np
import torch
from google.protobuf import any_pb2, json_format, struct_pb2, timestamp_pb2
from google.rpc import code_pb2, status_pb2

from sith.engine.errors import InvalidInput
from sith_api.v1 import sith_pb2 as pb
from sith_workers.errors import job_status
from sith_workers.queue import JobRecord

MAX_RESULT_BYTES = 3_500_000          # an Operation must stay under gRPC's 4 MB default
OPERATION_PREFIX = "operations/"
_STATES = {"queued": pb.OperationMetadata.QUEUED, "running": pb.OperationMetadata.RUNNING,
           "succeeded": pb.OperationMetadata.SUCCEEDED, "failed": pb.OperationMetadata.FAILED,
           "cancelled": pb.OperationMetadata.CANCELLED}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def tensor(t: torch.Tensor | np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t, dtype="<f4")
    return pb.Tensor(shape=list(array.shape), dtype=pb.Tensor.FLOAT32, data=array.tobytes())


def response(result: dict | None) -> any_pb2.Any:
    """The stored result as the Any clients receive: a typed message ("@type"), or a Struct for
    extension job kinds that return plain JSON."""
    packed = any_pb2.Any()
    if result and "@type" in result:
        json_format.ParseDict(result, packed)
    else:
        s = struct_pb2.Struct()
        s.update(result or {})
        packed.Pack(s)
    return packed


def operation(record: JobRecord) -> pb.Operation:
    """A sith_workers JobRecord as a sith.v1.Operation."""
    payload = record.payload or {}
    meta = pb.OperationMetadata(
        kind=record.kind, state=_STATES.get(record.state, pb.OperationMetadata.STATE_UNSPECIFIED),
        progress=float(record.progress), message=record.message, create_time=timestamp(record.created),
        update_time=timestamp(record.updated), target=str(payload.get("target", "")), attempts=record.attempts)
    op = pb.Operation(name=OPERATION_PREFIX + record.id, metadata=meta, done=record.done)
    if record.state == "succeeded":
        op.response.CopyFrom(response(record.result))
        if op.ByteSize() > MAX_RESULT_BYTES:
            op.error.CopyFrom(status_pb2.Status(
                code=code_pb2.RESOURCE_EXHAUSTED,
                message="the result is larger than one message allows; ask for fewer layers or heads"))
    elif record.state in ("failed", "cancelled"):
        op.error.CopyFrom(job_status(record.error, record.state))
    return op


def operation_id(name: str, field: str) -> str:
    """``operations/{id}`` or a bare id -> id (InvalidInput on anything else)."""
    ident = name[len(OPERATION_PREFIX):] if name.startswith(OPERATION_PREFIX) else name
    if not ident or not all(c in "0123456789abcdef" for c in ident) or len(ident) > 64:
        raise InvalidInput(field, f"expected '{OPERATION_PREFIX}<id>', got {name!r}")
    return ident
