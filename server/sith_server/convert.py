"""Conversions between the engine/jobs world (dicts, tensors, JobRecord) and sith.v1 messages."""

from __future__ import annotations

import numpy as np
import torch
from google.protobuf import any_pb2, json_format, struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from sith.engine.errors import InvalidInput
from sith_client.v1 import sith_pb2 as pb

MAX_RESULT_BYTES = 3_500_000          # an Operation must stay under gRPC's 4 MB default
OPERATION_PREFIX = "operations/"
EDIT_PREFIX = "edits/"
_STATES = {"queued": pb.OperationMetadata.QUEUED, "running": pb.OperationMetadata.RUNNING,
           "succeeded": pb.OperationMetadata.SUCCEEDED, "failed": pb.OperationMetadata.FAILED,
           "cancelled": pb.OperationMetadata.CANCELLED}
_ACTIONS = {pb.EditOperation.SUPPRESS: "suppress", pb.EditOperation.AMPLIFY: "amplify",
            pb.EditOperation.FLIP: "flip", pb.EditOperation.SCALE: "scale"}
_RULES = {pb.Selection.RULE_UNSPECIFIED: "top_n", pb.Selection.TOP_N: "top_n",
          pb.Selection.THRESHOLD: "threshold", pb.Selection.EXPLICIT: "explicit"}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def tensor(t: torch.Tensor | np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t, dtype="<f4")
    return pb.Tensor(shape=list(array.shape), dtype=pb.Tensor.FLOAT32, data=array.tobytes())


def struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def job_error(error: dict | None, state: str) -> status_pb2.Status:
    """A failed/cancelled job's google.rpc.Status (field + suggestions as BadRequest/ErrorInfo)."""
    if state == "cancelled":
        return status_pb2.Status(code=code_pb2.CANCELLED, message="the operation was cancelled")
    error = error or {}
    name = str(error.get("code", "internal")).upper()
    code = code_pb2.Code.Value(name) if name in code_pb2.Code.keys() else code_pb2.INTERNAL
    status = status_pb2.Status(code=code, message=str(error.get("reason", "the job failed")))
    if error.get("field"):
        detail = any_pb2.Any()
        description = status.message
        if error.get("suggestions"):
            description += f" (did you mean: {', '.join(error['suggestions'])}?)"
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error["field"], description=description)]))
        status.details.append(detail)
    return status


def operation(record) -> pb.Operation:
    """A sith_workers JobRecord as a sith.v1.Operation."""
    payload = record.payload or {}
    meta = pb.OperationMetadata(
        kind=record.kind, state=_STATES.get(record.state, pb.OperationMetadata.STATE_UNSPECIFIED),
        progress=float(record.progress), message=record.message, create_time=timestamp(record.created),
        update_time=timestamp(record.updated), target=str(payload.get("target", "")))
    op = pb.Operation(name=OPERATION_PREFIX + record.id, metadata=meta, done=record.done)
    if record.state == "succeeded":
        op.response.Pack(struct(record.result or {}))
        if op.ByteSize() > MAX_RESULT_BYTES:
            op.error.CopyFrom(status_pb2.Status(
                code=code_pb2.RESOURCE_EXHAUSTED,
                message="the result is larger than one message allows; ask for fewer layers or heads"))
    elif record.state in ("failed", "cancelled"):
        op.error.CopyFrom(job_error(record.error, record.state))
    return op


def resource_id(name: str, prefix: str, field: str) -> str:
    """``prefix + id`` or a bare id -> id (InvalidInput on anything else)."""
    ident = name[len(prefix):] if name.startswith(prefix) else name
    if not ident or not all(c in "0123456789abcdef" for c in ident) or len(ident) > 64:
        raise InvalidInput(field, f"expected '{prefix}<id>', got {name!r}")
    return ident


# ---- edit specs -----------------------------------------------------------------------------

def spec_to_dict(spec: pb.EditSpec, model: str) -> dict:
    """The proto spec as the dict ``sith.edits.spec.EditSpec.from_dict`` reads (fields: spec.*)."""
    operations = []
    for i, op in enumerate(spec.operations):
        field = f"spec.operations[{i}]"
        if op.action not in _ACTIONS:
            raise InvalidInput(f"{field}.action", "set an action: SUPPRESS, AMPLIFY, FLIP or SCALE")
        select = op.select
        rule = _RULES.get(select.rule)
        if rule is None:
            raise InvalidInput(f"{field}.select.rule", f"unknown rule {select.rule}")
        sel: dict = {"rule": rule}
        if rule == "top_n" and select.n:
            sel["n"] = select.n
        if rule == "threshold":
            sel["threshold"] = select.threshold
        if rule == "explicit":
            sel["vectors"] = [[v.layer, v.head, v.index] for v in select.vectors]
        operations.append({
            "concepts": list(op.concepts), "action": _ACTIONS[op.action],
            "strength": op.strength if op.HasField("strength") else None,
            "layers": list(op.layers) or None, "select": sel,
        })
    return {"version": spec.version or 1, "model": model, "operations": operations}


def spec_from_dict(d: dict, model: str) -> pb.EditSpec:
    """Back from the stored dict to the proto (``model`` = the name the client used)."""
    actions = {v: k for k, v in _ACTIONS.items()}
    rules = {"top_n": pb.Selection.TOP_N, "threshold": pb.Selection.THRESHOLD, "explicit": pb.Selection.EXPLICIT}
    spec = pb.EditSpec(model=model, version=int(d.get("version", 1)))
    for op in d.get("operations", []):
        sel = op.get("select") or {}
        msg = pb.EditOperation(concepts=op.get("concepts", []), action=actions.get(op.get("action"), 0),
                               layers=op.get("layers") or [])
        if op.get("strength") is not None:
            msg.strength = float(op["strength"])
        msg.select.rule = rules.get(sel.get("rule", "top_n"), pb.Selection.TOP_N)
        if sel.get("n") is not None:
            msg.select.n = int(sel["n"])
        if sel.get("threshold") is not None:
            msg.select.threshold = float(sel["threshold"])
        for layer, head, index in sel.get("vectors") or []:
            msg.select.vectors.add(layer=layer, head=head, index=index)
        spec.operations.append(msg)
    return spec


def to_json_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
