"""sith.v1.Operations: poll, cancel and follow jobs (google.longrunning style), per tenant."""

from __future__ import annotations

import logging
import threading

from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_server import convert
from sith_server.auth import current_tenant
from sith_server.deps import Deps
from sith_server.errors import NotFound, ResourceExhausted
from sith_workers.queue import JobNotFound, JobRecord

log = logging.getLogger(__name__)
WATCH_SLICE_S = 2.0           # re-check that the client is still there this often
# The client gives up at its deadline a moment before the server's copy of it expires, so an end
# this close to the deadline counts as the deadline (the client stopped waiting, not cancelling).
DEADLINE_SLACK_S = 0.5


def job_for_tenant(deps: Deps, name: str, field: str = "name") -> JobRecord:
    """The caller's job by operation name; another tenant's job reads as not found."""
    job_id = convert.operation_id(name, field)
    record = deps.queue.get(job_id)
    if record is None or record.tenant != current_tenant():
        raise NotFound("operation", convert.OPERATION_PREFIX + job_id, field=field)
    if record.done:
        deps.metrics.observe_job(record.id, record.kind, record.state, record.updated - record.created)
    return record


class OperationsServicer(pb_grpc.OperationsServicer):
    def __init__(self, deps: Deps, max_watchers: int = 32) -> None:
        self.deps = deps
        # Each open watch holds a server thread; the cap keeps threads free for everything else.
        self._watchers = threading.BoundedSemaphore(max_watchers)
        self._max_watchers = max_watchers

    def GetOperation(self, request, context):
        return convert.operation(job_for_tenant(self.deps, request.name))

    def CancelOperation(self, request, context):
        record = job_for_tenant(self.deps, request.name)
        try:
            record = self.deps.queue.cancel(record.id)
        except JobNotFound:
            raise NotFound("operation", convert.OPERATION_PREFIX + record.id) from None
        if record.kind == "edit" and record.payload.get("edit_id") and record.state == "cancelled":
            # cancelled before a worker started it: no worker will settle the edit, so do it here
            self.deps.edits.settle(record.tenant, record.payload["edit_id"], "cancelled", None)
        return convert.operation(record)

    def WatchOperation(self, request, context):
        record = job_for_tenant(self.deps, request.name)
        if not self._watchers.acquire(blocking=False):
            raise ResourceExhausted(f"{self._max_watchers} operations are being watched already; "
                                    "poll with GetOperation or retry later")
        try:
            yield from self._watch(record, request, context)
        finally:
            self._watchers.release()

    def _watch(self, record: JobRecord, request, context):
        ended = threading.Event()
        if not request.detach:
            context.add_callback(lambda: self._on_end(record.id, context, ended))
        yield convert.operation(record)
        after = "0"
        while not record.done and context.is_active():
            remaining = context.time_remaining()       # no deadline reads as a very large number
            if remaining <= 0:
                break
            budget = min(WATCH_SLICE_S, remaining)
            try:
                for event in self.deps.queue.events(record.id, timeout_s=budget, after=after):
                    after = event.id
                    record = self.deps.queue.get(record.id) or record
                    yield convert.operation(record)
                    if record.done or not context.is_active():
                        break
            except JobNotFound:                          # expired or deleted while watched
                raise NotFound("operation", convert.OPERATION_PREFIX + record.id) from None
        if record.done:
            self.deps.metrics.observe_job(record.id, record.kind, record.state, record.updated - record.created)
        ended.set()

    def _on_end(self, job_id: str, context, ended: threading.Event) -> None:
        """A stream that ended before the job did because the client cancelled cancels the job.

        Not on a deadline running out (the client only stopped waiting), nor on server shutdown
        (the job belongs to the queue, not to this process)."""
        if ended.is_set() or self.deps.stopping.is_set():
            return
        if context.time_remaining() <= DEADLINE_SLACK_S:
            return
        try:
            record = self.deps.queue.get(job_id)
            if record is not None and not record.done:
                self.deps.queue.cancel(job_id)
                log.info("client cancelled the watch of %s: job cancelled", job_id)
        except Exception as exc:  # the callback must never raise (Redis may be down)
            log.warning("could not cancel job %s after the client left: %s", job_id, exc)
