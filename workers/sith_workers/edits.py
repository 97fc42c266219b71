"""The edit resource: one record per edit, one state machine, one store (Redis).

An edit is ``tenants/{tenant}/edits/{id}``. Its record is a Redis hash holding the ``sith.v1.Edit``
message itself (the spec exactly as the server validated it, state, plan, artifact, error) plus
what only the service needs (the multipliers and the artifact's path). The server creates it
PENDING together with its job; the worker that runs the job moves it to READY (plan stored,
checkpoint exported) or FAILED (the job's google.rpc.Status) *before* it writes the job's terminal
state, so a crash in between re-runs the job and rewrites the same values (handlers are idempotent).

    PENDING --worker: planned + exported--> READY
    PENDING --worker/server: failed, cancelled, gave up--> FAILED

Layout (``p`` = prefix, ``t`` = tenant): ``p:tenant:{t}:edit:{id}`` hash (``edit`` = Edit bytes,
``state``, ``multipliers``, ``path``); ``p:tenant:{t}:edits`` sorted set by create time;
``p:tenant:{t}:edit-request:{request_id}`` -> id (24 h, deleted with the edit). Keys are per
tenant, so another tenant's edit does not exist for a caller.

Retention: edits carry no TTL (they are the product's durable output and ``volatile-lru`` never
evicts them); they live until DeleteEdit or the operator's garbage collection (docs/server.md).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
from google.rpc import code_pb2, status_pb2

from sith_api.v1 import sith_pb2 as pb
from sith_workers.connection import outage_as_unavailable

REQUEST_ID_TTL_S = 24 * 3600
_ID = re.compile(r"[0-9a-f]{32}")
STATES = {"pending": pb.Edit.PENDING, "ready": pb.Edit.READY, "failed": pb.Edit.FAILED}


def edit_name(tenant: str, edit_id: str) -> str:
    return f"tenants/{tenant}/edits/{edit_id}"


def parse_name(name: str, tenant: str) -> str | None:
    """The id in ``tenants/{tenant}/edits/{id}`` (or a bare id); None when malformed or when the
    name belongs to another tenant (which, for the caller, is the same as not existing)."""
    if _ID.fullmatch(name):
        return name
    prefix, sep, edit_id = name.rpartition("/edits/")
    if not sep or not prefix.startswith("tenants/") or not _ID.fullmatch(edit_id):
        return None
    return edit_id if prefix[len("tenants/"):] == tenant else ""


def _timestamp(seconds: float):
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


@dataclass
class EditRecord:
    """One stored edit: the API message plus the service-only parts."""

    tenant: str
    id: str
    edit: pb.Edit
    multipliers: bytes = b""     # sith.edits.Multipliers.to_bytes() once READY
    path: str = ""               # the exported checkpoint once READY

    @property
    def state(self) -> str:
        return {v: k for k, v in STATES.items()}.get(self.edit.state, "pending")

    @property
    def job_id(self) -> str:
        return self.edit.operation.rpartition("/")[2]


class EditStore:
    """Create, read, list, finish and delete edits (every method is one Redis round trip or one
    optimistic transaction, so concurrent writers never interleave half-records)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "sith") -> None:
        self.redis = redis_client
        self.prefix = prefix

    # ---- keys ---------------------------------------------------------------------------------
    def key(self, tenant: str, edit_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:edit:{edit_id}"

    def index_key(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:edits"

    def request_key(self, tenant: str, request_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:edit-request:{request_id}"

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    # ---- server side --------------------------------------------------------------------------
    def claim_request(self, tenant: str, request_id: str, edit_id: str) -> str:
        """Bind an idempotency key to ``edit_id`` unless it is already bound; the bound edit id."""
        key = self.request_key(tenant, request_id)
        with outage_as_unavailable(self.redis):
            while True:
                if self.redis.set(key, edit_id, nx=True, ex=REQUEST_ID_TTL_S):
                    return edit_id
                bound = self.redis.get(key)
                if bound is not None:
                    return bound.decode()

    def release_request(self, tenant: str, request_id: str) -> None:
        with outage_as_unavailable(self.redis):
            self.redis.delete(self.request_key(tenant, request_id))

    def create(self, tenant: str, edit_id: str, spec: pb.EditSpec, model_hash: str, request_id: str = "") -> EditRecord:
        """A new PENDING edit, not yet listed: :meth:`attach_job` lists it once its job is queued
        (the queue's ``stored_edits`` quota counts the listed edits, so a create over the quota
        leaves nothing behind but this record, which the server then deletes)."""
        now = time.time()
        edit = pb.Edit(name=edit_name(tenant, edit_id), spec=spec, state=pb.Edit.PENDING,
                       base_model_hash=model_hash, create_time=_timestamp(now), update_time=_timestamp(now),
                       request_id=request_id)
        with outage_as_unavailable(self.redis):
            self.redis.hset(self.key(tenant, edit_id), mapping={"edit": edit.SerializeToString(), "state": "pending"})
        return EditRecord(tenant, edit_id, edit)

    def attach_job(self, tenant: str, edit_id: str, job_id: str) -> EditRecord | None:
        """Record the edit's job and list the edit (None if it was deleted meanwhile)."""
        record = self._update(tenant, edit_id, lambda r: r.edit.__setattr__("operation", f"operations/{job_id}"),
                              allowed=("pending", "ready", "failed"))
        if record is not None:
            with outage_as_unavailable(self.redis):
                self.redis.zadd(self.index_key(tenant), {edit_id: record.edit.create_time.ToNanoseconds() / 1e9})
        return record

    def get(self, tenant: str, edit_id: str) -> EditRecord | None:
        with outage_as_unavailable(self.redis):
            raw = self.redis.hgetall(self.key(tenant, edit_id))
        return self._record(tenant, edit_id, raw)

    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[EditRecord], bool]:
        """A page of the tenant's edits, newest first, and whether more follow."""
        with outage_as_unavailable(self.redis):
            ids = self.redis.zrevrange(self.index_key(tenant), offset, offset + limit)
            pipe = self.redis.pipeline(transaction=False)
            for raw_id in ids[:limit]:
                pipe.hmget(self.key(tenant, raw_id.decode()), "edit", "state")
            rows = pipe.execute()
        records = []
        for raw_id, (edit, state) in zip(ids[:limit], rows):
            if edit is not None:
                records.append(self._record(tenant, raw_id.decode(), {b"edit": edit, b"state": state}))
        return records, len(ids) > limit  # type: ignore[return-value]

    def delete(self, tenant: str, edit_id: str) -> EditRecord | None:
        """Remove the edit, its index entry and its request_id binding; the record it had."""
        record = self.get(tenant, edit_id)
        if record is None:
            return None
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.key(tenant, edit_id))
            pipe.zrem(self.index_key(tenant), edit_id)
            if record.edit.request_id:
                pipe.delete(self.request_key(tenant, record.edit.request_id))
            pipe.execute()
        return record

    # ---- worker side --------------------------------------------------------------------------
    def ready(self, tenant: str, edit_id: str, plan: pb.EditPlan, multipliers: bytes, artifact: pb.Artifact,
              path: str) -> EditRecord | None:
        """PENDING (or READY, on a re-run) -> READY with the plan and the exported artifact."""
        def apply(r: EditRecord) -> None:
            r.edit.state = pb.Edit.READY
            r.edit.plan.CopyFrom(plan)
            r.edit.artifact.CopyFrom(artifact)
            r.edit.ClearField("error")
            r.multipliers, r.path = multipliers, path
        return self._update(tenant, edit_id, apply, allowed=("pending", "ready"))

    def fail(self, tenant: str, edit_id: str, status: status_pb2.Status) -> EditRecord | None:
        """PENDING -> FAILED with the reason (a READY edit stays READY)."""
        def apply(r: EditRecord) -> None:
            r.edit.state = pb.Edit.FAILED
            r.edit.error.CopyFrom(status)
        return self._update(tenant, edit_id, apply, allowed=("pending",))

    def settle(self, tenant: str, edit_id: str, job_state: str, status: status_pb2.Status | None) -> None:
        """Bring a PENDING edit in line with its finished job (failed, cancelled or given up)."""
        if job_state == "cancelled":
            status = status_pb2.Status(code=code_pb2.CANCELLED, message="the edit's job was cancelled")
        if job_state in ("failed", "cancelled"):
            self.fail(tenant, edit_id, status or status_pb2.Status(code=code_pb2.INTERNAL, message="the job failed"))

    # ---- internals ----------------------------------------------------------------------------
    def _record(self, tenant: str, edit_id: str, raw: dict[bytes, bytes]) -> EditRecord | None:
        if not raw or b"edit" not in raw:
            return None
        return EditRecord(tenant, edit_id, pb.Edit.FromString(raw[b"edit"]), raw.get(b"multipliers", b""),
                          raw.get(b"path", b"").decode())

    def _update(self, tenant: str, edit_id: str, apply: Callable[[EditRecord], None],
                allowed: tuple[str, ...]) -> EditRecord | None:
        """Read-modify-write under WATCH: None if the edit is gone (deleted) or not in ``allowed``."""
        key = self.key(tenant, edit_id)
        with outage_as_unavailable(self.redis):
            with self.redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        record = self._record(tenant, edit_id, pipe.hgetall(key))
                        if record is None or record.state not in allowed:
                            return None
                        apply(record)
                        record.edit.update_time.CopyFrom(_timestamp(time.time()))
                        state = {v: k for k, v in STATES.items()}[record.edit.state]
                        pipe.multi()
                        pipe.hset(key, mapping={"edit": record.edit.SerializeToString(), "state": state,
                                                "multipliers": record.multipliers, "path": record.path})
                        pipe.execute()
                        return record
                    except redis.WatchError:
                        continue
