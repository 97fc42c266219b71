"""Handles on server-side work: :class:`Job` (a long-running operation) and :class:`Edit`.

They hold data only, a snapshot of what the server last said (the ``sith.v1.Operation`` or
``sith.v1.Edit`` message itself, with typed views of it). Waiting, refreshing, cancelling and
downloading are calls, so they live on the client, sync or async alike::

    edit = client.wait(client.edit(suppress=["red"]))        # Edit, ready
    client.download(edit, "red-free.safetensors")
    job = client.find("red", wait=False); hits = client.result(job)
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message

from .errors import Cancelled, JobFailed, SithError, from_status
from .types import EditState, JobState, timestamp
from sith_api.v1 import sith_pb2 as pb

T = TypeVar("T", bound=Message)

__all__ = ["Job", "Edit"]

_JOB_STATES: dict[int, JobState] = {
    pb.OperationMetadata.QUEUED: "queued",
    pb.OperationMetadata.RUNNING: "running",
    pb.OperationMetadata.SUCCEEDED: "succeeded",
    pb.OperationMetadata.FAILED: "failed",
    pb.OperationMetadata.CANCELLED: "cancelled",
}
_EDIT_STATES: dict[int, EditState] = {pb.Edit.PENDING: "pending", pb.Edit.READY: "ready", pb.Edit.FAILED: "failed"}


@dataclass(frozen=True)
class Job(Generic[T]):
    """A snapshot of an operation; ``result_type`` is the message its response holds."""

    operation: pb.Operation
    result_type: type[T] | None = None

    @property
    def name(self) -> str:
        return self.operation.name

    @property
    def id(self) -> str:
        return self.name.rpartition("/")[2]

    @property
    def kind(self) -> str:
        return self.operation.metadata.kind

    @property
    def done(self) -> bool:
        return self.operation.done

    @property
    def state(self) -> JobState:
        state = _JOB_STATES.get(self.operation.metadata.state, "unspecified")
        if self.done and state in ("queued", "running", "unspecified"):
            return "failed" if self.operation.HasField("error") else "succeeded"
        return state

    @property
    def progress(self) -> float:
        return self.operation.metadata.progress

    @property
    def message(self) -> str:
        return self.operation.metadata.message

    @property
    def target(self) -> str:
        return self.operation.metadata.target

    @property
    def create_time(self) -> _dt.datetime | None:
        return timestamp(self.operation.metadata.create_time)

    @property
    def update_time(self) -> _dt.datetime | None:
        return timestamp(self.operation.metadata.update_time)

    @property
    def error(self) -> SithError | None:
        return from_status(self.operation.error) if self.operation.HasField("error") else None

    def result(self) -> T:
        """The typed result of a finished job; :class:`JobFailed` (also of the job's own error type,
        e.g. InvalidArgument) if it failed or was cancelled."""
        if not self.done:
            raise SithError(f"{self.name} is {self.state}; wait for it first (client.wait / client.result)")
        cause = self.error
        if cause is not None or self.state in ("failed", "cancelled"):
            cause = cause or (Cancelled("cancelled") if self.state == "cancelled" else None)
            what = cause.message if cause else self.message or "no reason given"
            raise JobFailed.create(f"{self.kind or 'job'} {self.name} {self.state}: {what}", operation=self.name,
                                   cause=cause)
        response = self.operation.response
        kind = self.result_type or _message_class(response.type_url)
        message = kind()
        if not response.Unpack(message):
            raise SithError(f"{self.name} returned {response.type_url}, expected {kind.DESCRIPTOR.full_name}")
        return message  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<Job {self.name} {self.kind} {self.state} {self.progress:.0%}>"


def _message_class(type_url: str) -> type[Message]:
    """The generated class of an Any's type (sith.v1 results, or google.protobuf.Struct)."""
    from google.protobuf import descriptor_pool, message_factory, struct_pb2  # noqa: F401 - registers Struct

    name = type_url.rpartition("/")[2]
    try:
        return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))
    except KeyError:
        raise SithError(f"the server returned a result of unknown type {name!r}; upgrade sith-client") from None


@dataclass(frozen=True)
class Edit:
    """A snapshot of a stored edit (``message`` is the sith.v1.Edit); state pending → ready | failed."""

    message: pb.Edit

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def id(self) -> str:
        return self.name.rpartition("/")[2]

    @property
    def state(self) -> EditState:
        return _EDIT_STATES.get(self.message.state, "unspecified")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def spec(self) -> pb.EditSpec:
        return self.message.spec

    @property
    def plan(self) -> pb.EditPlan | None:
        """The stored plan once ready (None in list results or before it is ready)."""
        return self.message.plan if self.message.HasField("plan") else None

    @property
    def artifact(self) -> pb.Artifact | None:
        return self.message.artifact if self.message.HasField("artifact") else None

    @property
    def operation(self) -> str:
        return self.message.operation

    @property
    def base_model_hash(self) -> str:
        return self.message.base_model_hash

    @property
    def create_time(self) -> _dt.datetime | None:
        return timestamp(self.message.create_time)

    @property
    def error(self) -> SithError | None:
        e = self.message.error
        return from_status(e) if self.message.HasField("error") and e.code else None

    def check(self) -> Edit:
        """``self``, or :class:`JobFailed` (of the edit's error type) when the edit failed."""
        if self.state == "failed":
            cause = self.error
            what = cause.message if cause else "no reason given"
            raise JobFailed.create(f"edit {self.name} failed: {what}", operation=self.operation, cause=cause)
        return self

    def __repr__(self) -> str:
        ops = ", ".join(f"{pb.EditOperation.Action.Name(o.action).lower()} {'/'.join(o.concepts)}"
                        for o in self.spec.operations)
        return f"<Edit {self.name} {self.state} [{ops}]>"
