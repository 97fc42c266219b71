"""sith.v1.Edits: validate a spec once, store it as sent, queue its job; report and stream edits.

The request's ``sith.v1.EditSpec`` is the canonical form: it is validated here (the proto's bounds
by the interceptor, the library's rules through ``sith_workers.specs.to_library``, and what needs
the model or vocabulary below), then stored unchanged in the edit's one record
(``sith_workers.edits.EditStore``). The worker plans, applies and exports it and moves the record
to READY or FAILED; this servicer only reads the record and streams the exported file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time

from google.protobuf import json_format

from sith.edits.plan import operation_layers
from sith.edits.spec import ANCHOR_RULES
from sith.engine.errors import InvalidInput
from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_server import convert, validate
from sith_server.auth import current_tenant
from sith_server.deps import Deps
from sith_server.errors import FailedPrecondition, NotFound, Unavailable
from sith_server.runtime import ServedModel
from sith_server.servicers.analysis import worker_ref
from sith_workers import specs
from sith_workers.edits import EditRecord, parse_name

REPLAY_WAIT_STEPS, REPLAY_WAIT_S = 20, 0.1  # a duplicate may arrive while the first create is running
MAX_PLAN_BYTES = convert.MAX_RESULT_BYTES


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_chunk(handle, offset: int, size: int, header: pb.CheckpointChunk | None = None) -> bytes:
    """One ``CheckpointChunk`` as wire bytes, built around the block read from ``handle``.

    The block is read once and joined with a few header bytes into the buffer gRPC sends: no
    protobuf message holds a copy and no serialisation copies it again. Field 1 (``data``) is laid
    out by hand, the small fields (``offset``, and on the first chunk size/sha256/filename) by
    protobuf; readers accept fields in any order, so clients decode an ordinary CheckpointChunk.
    """
    if header is not None:
        head = header.SerializeToString()
    else:
        head = b"\x10" + _varint(offset) if offset else b""  # field 2 (offset), varint
    data = handle.read(size)
    if len(data) != size:
        raise FailedPrecondition("artifact", f"the exported checkpoint ended early ({len(data)} of {size} bytes)")
    return b"".join((head, b"\x0a", _varint(size), data))   # field 1 (data), length-delimited


def serialize_chunk(chunk: pb.CheckpointChunk | bytes) -> bytes:
    """DownloadEdit's response serializer: pre-encoded chunks pass through untouched."""
    return chunk if isinstance(chunk, bytes) else chunk.SerializeToString()


def add_to_server(servicer: EditsServicer, server) -> None:
    """The generated registration of sith.v1.Edits, with DownloadEdit's pass-through serializer."""
    import grpc

    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Edits"].methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        factory = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        serializer = serialize_chunk if method.name == "DownloadEdit" else response.SerializeToString
        handlers[method.name] = factory(getattr(servicer, method.name), request_deserializer=request.FromString,
                                        response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("sith.v1.Edits", handlers),))
    server.add_registered_method_handlers("sith.v1.Edits", handlers)


def checked_spec(deps: Deps, spec: pb.EditSpec) -> ServedModel:
    """Every rule of the spec checked, so a bad edit never reaches the queue; the model it edits."""
    served = deps.runtime.get(spec.model, "spec.model")
    try:
        library_spec = specs.to_library(spec, worker_ref(served))
    except InvalidInput as exc:
        raise InvalidInput(f"spec.{exc.field}", exc.reason, exc.suggestions) from None
    info = served.loaded.info
    try:
        layers = operation_layers(info, library_spec)
    except InvalidInput as exc:
        raise InvalidInput(f"spec.{exc.field}", exc.reason, exc.suggestions) from None
    for i, op in enumerate(spec.operations):
        field = f"spec.operations[{i}]"
        deps.vocabulary.check(list(op.concepts), f"{field}.concepts")
        if op.preserve:
            deps.vocabulary.check(list(op.preserve), f"{field}.preserve")
        if op.anchor.strip() not in ("", *ANCHOR_RULES):
            try:
                deps.vocabulary.check([op.anchor], f"{field}.anchor")
            except InvalidInput as exc:
                raise InvalidInput(f"{field}.anchor", exc.reason, exc.suggestions) from None
        for j, v in enumerate(op.select.vectors):
            vfield = f"{field}.select.vectors[{j}]"
            if v.layer not in layers[i]:
                raise InvalidInput(f"{vfield}.layer", f"layer {v.layer} is not among the operation's layers "
                                   f"{layers[i]} (set {field}.layers to include it)")
            if v.head >= info.heads:
                raise InvalidInput(f"{vfield}.head", f"head {v.head} is out of range (0..{info.heads - 1})")
            if v.index >= info.head_dim:
                raise InvalidInput(f"{vfield}.index", f"index {v.index} is out of range (0..{info.head_dim - 1})")
    return served


def page_token(tenant: str, offset: int) -> str:
    """An opaque token for the page at ``offset`` of ``tenant``'s list (bound to the tenant)."""
    raw = f"{offset}:{hashlib.sha256(tenant.encode()).hexdigest()[:16]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_offset(token: str, tenant: str) -> int:
    """The offset in a token :func:`page_token` made for this tenant (InvalidInput otherwise)."""
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        offset_text, _, tag = raw.partition(":")
        offset = int(offset_text) if offset_text.isascii() and offset_text.isdecimal() else -1
    except (binascii.Error, UnicodeDecodeError, ValueError):
        offset = -1
    if offset < 0 or page_token(tenant, offset) != token:
        raise InvalidInput("page_token", "not a token this server returned; pass next_page_token unchanged")
    return offset


class EditsServicer(pb_grpc.EditsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    # ---- helpers --------------------------------------------------------------------------
    def record(self, name: str, field: str = "name") -> EditRecord:
        """The caller's edit by name; another tenant's edit reads as not found."""
        tenant = current_tenant()
        edit_id = parse_name(name, tenant)
        if edit_id is None:
            raise InvalidInput(field, f"expected 'tenants/{{tenant}}/edits/{{id}}', got {name!r}")
        record = self.deps.edits.get(tenant, edit_id) if edit_id else None
        if record is None:
            raise NotFound("edit", name, field=field)
        return record

    def ready(self, name: str, field: str = "name") -> EditRecord:
        record = self.record(name, field)
        if record.state != "ready":
            raise FailedPrecondition(record.edit.name, f"the edit is {record.state}, not ready "
                                     f"(its job: {record.edit.operation or 'not queued yet'})")
        return record

    def edited_model(self, name: str, field: str = "name"):
        """The edited model of a READY edit, loaded once from its exported checkpoint."""
        record = self.ready(name, field)
        base = self.deps.runtime.get(record.edit.base_model_hash).loaded
        from sith_server.runtime import load_edited

        key = f"{record.id}:{record.edit.artifact.sha256}"
        return self.deps.runtime.edited(key, lambda: load_edited(base, record.path, f"{base.name}@{record.id[:8]}"))

    def _job(self, served: ServedModel, target: str, **payload):
        return self.deps.queue.submit("edit", {"model": worker_ref(served), "target": target, **payload,
                                               **self.deps.vocabulary.job_fields()}, current_tenant())

    # ---- RPCs -----------------------------------------------------------------------------
    def PreviewEdit(self, request, context):
        served = checked_spec(self.deps, request.spec)
        spec = json_format.MessageToDict(request.spec, preserving_proto_field_name=True)
        return convert.operation(self._job(served, served.loaded.name, spec=spec, dry_run=True))

    def CreateEdit(self, request, context):
        served = checked_spec(self.deps, request.spec)
        store, tenant = self.deps.edits, current_tenant()
        request_id = validate.request_id(request.request_id)
        edit_id = store.new_id()
        if request_id:
            bound = store.claim_request(tenant, request_id, edit_id)
            if bound != edit_id:
                return self._replayed(bound, tenant, request.spec, request_id)
        spec = pb.EditSpec()
        spec.CopyFrom(request.spec)
        spec.version = spec.version or 1
        try:
            record = store.create(tenant, edit_id, spec, served.loaded.hash, request_id)
            job = self._job(served, record.edit.name, edit_id=edit_id)
            record = store.attach_job(tenant, edit_id, job.id) or record
        except BaseException:
            store.delete(tenant, edit_id)
            if request_id:
                store.release_request(tenant, request_id)
            raise
        return record.edit

    def _replayed(self, edit_id: str, tenant: str, spec: pb.EditSpec, request_id: str) -> pb.Edit:
        """The edit a first call with this request_id created (waiting briefly if it is mid-create)."""
        for _ in range(REPLAY_WAIT_STEPS):
            record = self.deps.edits.get(tenant, edit_id)
            if record is None or not record.edit.operation:
                time.sleep(REPLAY_WAIT_S)
                continue
            first = pb.EditSpec()
            first.CopyFrom(spec)
            first.version = first.version or 1
            if record.edit.spec != first:
                raise InvalidInput("request_id", f"{request_id!r} was already used for a different edit spec "
                                   f"({record.edit.name}); use a new request_id for a new edit")
            edit = pb.Edit()
            edit.CopyFrom(record.edit)
            edit.ClearField("plan")
            return edit
        raise Unavailable(f"the create with request_id {request_id!r} is still in progress; retry")

    def GetEdit(self, request, context):
        edit = self.record(request.name).edit
        if edit.ByteSize() > MAX_PLAN_BYTES:
            edit.ClearField("plan")
            edit.plan_omitted = True
        return edit

    def ListEdits(self, request, context):
        tenant = current_tenant()
        size = int(validate.value(request, "page_size"))
        offset = page_offset(request.page_token, tenant)
        records, more = self.deps.edits.list(tenant, offset, size)
        edits = []
        for r in records:
            r.edit.ClearField("plan")
            edits.append(r.edit)
        return pb.ListEditsResponse(edits=edits, next_page_token=page_token(tenant, offset + size) if more else "")

    def DeleteEdit(self, request, context):
        record = self.record(request.name)
        self.deps.edits.delete(record.tenant, record.id)
        job = self.deps.queue.get(record.job_id) if record.job_id else None
        if job is not None and not job.done:
            self.deps.queue.cancel(job.id)
        self.deps.runtime.forget(record.id)
        if record.path:
            from pathlib import Path

            Path(record.path).unlink(missing_ok=True)
        return pb.DeleteEditResponse()

    def GetDownloadUrl(self, request, context):
        record = self.ready(request.name)
        out = pb.DownloadUrl(artifact=record.edit.artifact)
        endpoint = self.deps.downloads
        if endpoint is not None:
            url, expires = endpoint.url(record.tenant, record.id)
            out.url = url
            out.expire_time.FromSeconds(expires)
        return out

    def DownloadEdit(self, request, context):
        record = self.ready(request.name)
        artifact = record.edit.artifact
        try:
            handle = open(record.path, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError:
            raise FailedPrecondition(record.edit.name, "the exported checkpoint is missing on this server "
                                     "(SITH_DATA_DIR must be shared with the workers)") from None
        try:
            total = artifact.size_bytes
            if request.offset > total:
                raise InvalidInput("offset", f"must be between 0 and {total}, got {request.offset}")
            chunk = int(validate.value(request, "chunk_bytes"))
            first = pb.CheckpointChunk(offset=request.offset, total_bytes=total, sha256=artifact.sha256,
                                       filename=artifact.filename)
            handle.seek(request.offset)
            offset = request.offset
            size = min(chunk, total - offset)
            yield encode_chunk(handle, offset, size, header=first)
            offset += size
            while offset < total and context.is_active():
                size = min(chunk, total - offset)
                yield encode_chunk(handle, offset, size)
                offset += size
        finally:
            handle.close()
