"""Handles on server-side work: :class:`Job` (a long-running operation) and :class:`Edit`.

They are small snapshots bound to the client that fetched them, so calls chain naturally::

    client.edit(suppress=["red"]).wait(progress=True).download("out.safetensors")

``AsyncJob``/``AsyncEdit`` are the asyncio twins returned by :class:`~sith_client.AsyncClient`;
their ``wait``/``refresh``/``download`` are coroutines.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _progress
from ._requests import operation_result
from .errors import Cancelled, JobFailed, SithError, from_status
from .types import EditOp, EditPreview, EditState, JobState, struct_to_dict, timestamp
from .v1 import sith_pb2 as pb

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .client import Client

T = TypeVar("T")

__all__ = ["Job", "AsyncJob", "Edit", "AsyncEdit"]

_JOB_STATES: dict[int, JobState] = {
    pb.OperationMetadata.QUEUED: "queued",
    pb.OperationMetadata.RUNNING: "running",
    pb.OperationMetadata.SUCCEEDED: "succeeded",
    pb.OperationMetadata.FAILED: "failed",
    pb.OperationMetadata.CANCELLED: "cancelled",
}
_EDIT_STATES: dict[int, EditState] = {
    pb.Edit.PENDING: "pending",
    pb.Edit.READY: "ready",
    pb.Edit.FAILED: "failed",
}


class _JobBase(Generic[T]):
    """Snapshot of an operation: state, progress, and (once done) result or error."""

    name: str
    kind: str
    state: JobState
    progress: float
    message: str
    done: bool
    target: str
    create_time: _dt.datetime | None
    update_time: _dt.datetime | None
    error: SithError | None

    def __init__(self, client: Any, op: pb.Operation, parse: Callable[[dict[str, Any]], T]) -> None:
        self._client = client
        self._parse = parse
        self._result_doc: dict[str, Any] | None = None
        self._update(op)

    def _update(self, op: pb.Operation) -> None:
        m = op.metadata
        self.name = op.name
        self.kind = m.kind
        self.done = op.done
        self.progress = m.progress
        self.message = m.message
        self.target = m.target
        self.create_time = timestamp(m.create_time)
        self.update_time = timestamp(m.update_time)
        self.state = _JOB_STATES.get(m.state, "unspecified")
        if op.done and self.state in ("queued", "running", "unspecified"):
            self.state = "failed" if op.HasField("error") else "succeeded"
        self.error = from_status(op.error) if op.HasField("error") else None
        self._result_doc = operation_result(op) if op.done and op.HasField("response") else None

    @property
    def id(self) -> str:
        return self.name.rpartition("/")[2]

    @property
    def raw_result(self) -> dict[str, Any] | None:
        """The untyped result document, when done and succeeded."""
        return self._result_doc

    def _finished(self) -> T:
        """The typed result of a finished job, or the typed reason it failed."""
        if self.error is not None or self.state in ("failed", "cancelled"):
            cause = self.error or (Cancelled("cancelled") if self.state == "cancelled" else None)
            what = cause.message if cause else self.message or "no reason given"
            raise JobFailed.create(f"{self.kind or 'job'} {self.name} {self.state}: {what}", operation=self.name, cause=cause)
        return self._parse(self._result_doc or {})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.kind} {self.state} {self.progress:.0%}>"


class Job(_JobBase[T]):
    """A long-running operation on a sync :class:`~sith_client.Client`."""

    _client: Client

    def refresh(self) -> Job[T]:
        self._update(self._client._get_operation(self.name))
        return self

    def wait(self, *, timeout: float | None = None, progress: _progress.ProgressArg = False) -> Job[T]:
        """Block until done (streaming progress). Raises :class:`JobFailed` if it failed or was
        cancelled, :class:`~sith_client.errors.DeadlineExceeded` after ``timeout`` seconds."""
        cb = _progress.callback(progress)

        def on_update(op: pb.Operation) -> None:
            self._update(op)
            if cb:
                cb(self)

        if not self.done:
            self._client._wait_operation(self.name, timeout, on_update)
        elif cb:
            cb(self)
        self._finished()
        return self

    def result(self, *, timeout: float | None = None, progress: _progress.ProgressArg = False) -> T:
        """Wait, then return the typed result (e.g. ``list[HeadExplanation]``)."""
        return self.wait(timeout=timeout, progress=progress)._finished()

    def cancel(self) -> Job[T]:
        """Ask the server to stop the job (best effort); the snapshot shows what it said."""
        self._update(self._client._cancel_operation(self.name))
        return self


class AsyncJob(_JobBase[T]):
    """A long-running operation on an :class:`~sith_client.AsyncClient`."""

    _client: AsyncClient

    async def refresh(self) -> AsyncJob[T]:
        self._update(await self._client._get_operation(self.name))
        return self

    async def wait(self, *, timeout: float | None = None, progress: _progress.ProgressArg = False) -> AsyncJob[T]:
        cb = _progress.callback(progress)

        def on_update(op: pb.Operation) -> None:
            self._update(op)
            if cb:
                cb(self)

        if not self.done:
            await self._client._wait_operation(self.name, timeout, on_update)
        elif cb:
            cb(self)
        self._finished()
        return self

    async def result(self, *, timeout: float | None = None, progress: _progress.ProgressArg = False) -> T:
        return (await self.wait(timeout=timeout, progress=progress))._finished()

    async def cancel(self) -> AsyncJob[T]:
        self._update(await self._client._cancel_operation(self.name))
        return self


# --- edits -------------------------------------------------------------------------------------


class _EditBase:
    """Snapshot of a stored edit. ``state`` goes pending → ready (or failed)."""

    name: str
    state: EditState
    model: str
    operations: tuple[EditOp, ...]
    operation: str
    base_model_hash: str
    create_time: _dt.datetime | None
    plan: dict[str, Any]
    error: SithError | None

    def __init__(self, client: Any, e: pb.Edit) -> None:
        self._client = client
        self._update(e)

    def _update(self, e: pb.Edit) -> None:
        self.name = e.name
        self.state = _EDIT_STATES.get(e.state, "unspecified")
        self.model = e.spec.model
        self.operations = tuple(EditOp.from_proto(op) for op in e.spec.operations)
        self.operation = e.operation
        self.base_model_hash = e.base_model_hash
        self.create_time = timestamp(e.create_time)
        self.plan = struct_to_dict(e.plan) if e.HasField("plan") else {}
        self.error = from_status(e.error) if e.HasField("error") and e.error.code else None

    @property
    def id(self) -> str:
        return self.name.rpartition("/")[2]

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def preview(self) -> EditPreview:
        """The stored plan, typed (which vectors were rescaled, by how much)."""
        return EditPreview.from_dict(self.plan)

    def _check(self) -> None:
        if self.state == "failed":
            what = self.error.message if self.error else "no reason given"
            raise JobFailed.create(f"edit {self.name} failed: {what}", operation=self.operation, cause=self.error)

    def __repr__(self) -> str:
        ops = ", ".join(f"{o.action} {'/'.join(o.concepts)}" for o in self.operations)
        return f"<{type(self).__name__} {self.name} {self.state} [{ops}]>"


class Edit(_EditBase):
    """A stored edit on a sync :class:`~sith_client.Client`."""

    _client: Client

    def refresh(self) -> Edit:
        self._update(self._client._get_edit_proto(self.name))
        return self

    def wait(self, *, timeout: float | None = None, progress: _progress.ProgressArg = False) -> Edit:
        """Block until the edit is planned and ready; raises :class:`JobFailed` if planning failed."""
        if self.state == "pending" and self.operation:
            job = Job(self._client, self._client._get_operation(self.operation), dict)
            try:
                job.wait(timeout=timeout, progress=progress)
            except JobFailed:
                pass  # the edit record carries the authoritative error; read it below
        self.refresh()
        self._check()
        return self

    def download(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Stream the edited open_clip checkpoint to ``path`` (verified, atomic); returns the path."""
        return self._client.download(self, path, overwrite=overwrite)

    def delete(self) -> None:
        self._client.delete_edit(self.name)


class AsyncEdit(_EditBase):
    """A stored edit on an :class:`~sith_client.AsyncClient`."""

    _client: AsyncClient

    async def refresh(self) -> AsyncEdit:
        self._update(await self._client._get_edit_proto(self.name))
        return self

    async def wait(self, *, timeout: float | None = None, progress: _progress.ProgressArg = False) -> AsyncEdit:
        if self.state == "pending" and self.operation:
            job = AsyncJob(self._client, await self._client._get_operation(self.operation), dict)
            try:
                await job.wait(timeout=timeout, progress=progress)
            except JobFailed:
                pass
        await self.refresh()
        self._check()
        return self

    async def download(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        return await self._client.download(self, path, overwrite=overwrite)

    async def delete(self) -> None:
        await self._client.delete_edit(self.name)
