"""sith.v1.Edits: validate specs, queue planning jobs, report edits, stream edited checkpoints."""

from __future__ import annotations

import time

from google.rpc import code_pb2, status_pb2

from sith.edits.spec import EditSpec
from sith.engine.errors import InvalidInput
from sith_client.v1 import sith_pb2 as pb
from sith_client.v1 import sith_pb2_grpc as pb_grpc
from sith_server import convert, edited, validate
from sith_server.auth import current_tenant
from sith_server.deps import Deps
from sith_server.edit_store import EditRecord, now
from sith_server.errors import FailedPrecondition, NotFound, Unavailable
from sith_server.runtime import ServedModel
from sith_server.servicers.analysis import worker_ref

MAX_OPERATIONS = 32
REPLAY_WAIT_STEPS, REPLAY_WAIT_S = 20, 0.1  # a duplicate may arrive while the first create is running
DEFAULT_PAGE = 50
MAX_PAGE = 100


def checked_spec(deps: Deps, spec: pb.EditSpec) -> tuple[ServedModel, dict]:
    """Every field of the spec checked here, so a bad edit never reaches the queue."""
    served = deps.runtime.get(validate.text(spec.model, "spec.model"), "spec.model")
    validate.count(spec.operations, "spec.operations", 1, MAX_OPERATIONS)
    data = convert.spec_to_dict(spec, worker_ref(served))
    try:
        EditSpec.from_dict(data)
    except InvalidInput as exc:
        field = exc.field if exc.field.startswith("spec") else f"spec.{exc.field}"
        raise InvalidInput(field, exc.reason, exc.suggestions) from None
    info = served.loaded.info
    for i, op in enumerate(spec.operations):
        field = f"spec.operations[{i}]"
        validate.count(op.concepts, f"{field}.concepts", 1, 16)
        deps.vocabulary.check(list(op.concepts), f"{field}.concepts")
        validate.layers(info, op.layers, f"{field}.layers")
        for j, v in enumerate(op.select.vectors):
            vfield = f"{field}.select.vectors[{j}]"
            validate.in_range(v.layer, f"{vfield}.layer", 0, info.layers - 1)
            validate.in_range(v.head, f"{vfield}.head", 0, info.heads - 1)
            validate.in_range(v.index, f"{vfield}.index", 0, info.head_dim - 1)
    return served, data


class EditsServicer(pb_grpc.EditsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    # ---- helpers --------------------------------------------------------------------------
    def _edit(self, record: EditRecord, with_plan: bool = True) -> pb.Edit:
        edit = pb.Edit(name=convert.EDIT_PREFIX + record.id, spec=convert.spec_from_dict(record.spec, record.model),
                       operation=convert.OPERATION_PREFIX + record.job_id, base_model_hash=record.model_hash,
                       create_time=convert.timestamp(record.created))
        job = self.deps.queue.get(record.job_id)
        finished = self.deps.finished_edits.get(record.tenant, record.id)
        if finished is not None:
            edit.state = pb.Edit.READY
            if with_plan:
                edit.plan.update(finished.plan)
                if edit.ByteSize() > convert.MAX_RESULT_BYTES:
                    edit.plan.Clear()
                    edit.plan.update({"truncated": True, "message": "the plan is too large for one message; "
                                      "download the edit: its manifest carries the full plan"})
        elif job is None:
            edit.state = pb.Edit.FAILED
            edit.error.CopyFrom(status_pb2.Status(code=code_pb2.NOT_FOUND, message="the planning job expired"))
        elif job.state in ("failed", "cancelled") or (job.state == "succeeded"):
            edit.state = pb.Edit.FAILED
            edit.error.CopyFrom(convert.job_error(job.error, job.state) if job.state != "succeeded" else
                                status_pb2.Status(code=code_pb2.INTERNAL, message="the job stored no edit"))
        else:
            edit.state = pb.Edit.PENDING
        return edit

    def ready(self, name: str, field: str = "name"):
        """(request record, finished edit) of a READY edit of the caller."""
        edit_id = convert.resource_id(name, convert.EDIT_PREFIX, field)
        record = self.deps.edits.get(edit_id, current_tenant())
        finished = self.deps.finished_edits.get(record.tenant, edit_id)
        if finished is None:
            raise FailedPrecondition(convert.EDIT_PREFIX + edit_id, "the edit is not ready (its planning job "
                                     f"operations/{record.job_id} has not succeeded)")
        return record, finished

    def edited_model(self, name: str, field: str = "name"):
        record, finished = self.ready(name, field)
        base = self.deps.runtime.get(record.model_hash).loaded
        return record, finished, self.deps.runtime.edited(
            record.id, lambda: edited.build(base, finished.multipliers, f"{base.name}@{record.id[:8]}"))

    # ---- RPCs -----------------------------------------------------------------------------
    def _plan(self, data: dict, target: str, **extra):
        """Queue the planning job ("edit" kind; ``dry_run`` for previews)."""
        payload = {"spec": data, "model": data["model"], "target": target, **extra,
                   **self.deps.vocabulary.job_fields()}
        return self.deps.queue.submit("edit", payload, current_tenant())

    def PreviewEdit(self, request, context):
        served, data = checked_spec(self.deps, request.spec)
        return convert.operation(self._plan(data, served.loaded.name, dry_run=True))

    def CreateEdit(self, request, context):
        served, data = checked_spec(self.deps, request.spec)
        tenant, edit_id = current_tenant(), self.deps.edits.new_id()
        request_id = validate.request_id(request.request_id, "request_id")
        if request_id:
            bound = self.deps.edits.claim_request(tenant, request_id, edit_id)
            if bound != edit_id:
                return self._edit(self._replayed(bound, tenant, data, request_id))
        try:
            job = self._plan(data, convert.EDIT_PREFIX + edit_id, edit_id=edit_id)
            record = EditRecord(id=edit_id, tenant=tenant, spec=data, model=request.spec.model,
                                model_hash=served.loaded.hash, job_id=job.id, created=now())
            self.deps.edits.put(record)
        except BaseException:
            if request_id:
                self.deps.edits.release_request(tenant, request_id)
            raise
        return self._edit(record)

    def _replayed(self, edit_id: str, tenant: str, spec: dict, request_id: str) -> EditRecord:
        """The edit a first call with this request_id created (waiting briefly if it is mid-create)."""
        for _ in range(REPLAY_WAIT_STEPS):
            try:
                record = self.deps.edits.get(edit_id, tenant)
            except NotFound:
                time.sleep(REPLAY_WAIT_S)
                continue
            if record.spec != spec:
                raise InvalidInput("request_id", f"{request_id!r} was already used for a different edit spec "
                                   f"(edits/{edit_id}); use a new request_id for a new edit")
            return record
        raise Unavailable(f"the create with request_id {request_id!r} is still in progress; retry")

    def GetEdit(self, request, context):
        edit_id = convert.resource_id(request.name, convert.EDIT_PREFIX, "name")
        return self._edit(self.deps.edits.get(edit_id, current_tenant()))

    def ListEdits(self, request, context):
        size = request.page_size or DEFAULT_PAGE
        validate.in_range(size, "page_size", 1, MAX_PAGE)
        token = request.page_token or "0"
        if not token.isdigit() or len(token) > 9:
            raise InvalidInput("page_token", "not a token this server returned")
        records, more = self.deps.edits.list(current_tenant(), int(token), size)
        return pb.ListEditsResponse(edits=[self._edit(r, with_plan=False) for r in records],
                                    next_page_token=str(int(token) + size) if more else "")

    def DeleteEdit(self, request, context):
        edit_id = convert.resource_id(request.name, convert.EDIT_PREFIX, "name")
        record = self.deps.edits.delete(edit_id, current_tenant())
        self.deps.finished_edits.delete(record.tenant, edit_id)
        job = self.deps.queue.get(record.job_id)
        if job is not None and not job.done:
            self.deps.queue.cancel(job.id)
        self.deps.runtime.forget(edit_id)
        for path in self._checkpoint_path(record).parent.glob(f"{edit_id}.*"):
            path.unlink(missing_ok=True)
        return pb.DeleteEditResponse()

    def _checkpoint_path(self, record: EditRecord):
        return self.deps.config.data_dir / "edits" / record.tenant / f"{record.id}.safetensors"

    def DownloadEdit(self, request, context):
        record, finished, model = self.edited_model(request.name)
        path, digest = edited.checkpoint(self._checkpoint_path(record), model, finished.manifest)
        total = path.stat().st_size
        validate.in_range(request.offset, "offset", 0, total)
        first = pb.CheckpointChunk(offset=request.offset, total_bytes=total, sha256=digest,
                                   filename=f"{record.id}.safetensors")
        if request.offset == total:  # resuming a download that already has every byte
            yield first
            return
        for offset, data in edited.chunks(path, request.offset):
            if not context.is_active():
                return
            if offset == request.offset:
                first.data = data
                yield first
            else:
                yield pb.CheckpointChunk(data=data, offset=offset)
