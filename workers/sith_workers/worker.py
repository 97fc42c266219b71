"""One worker process: owns a device, takes jobs from the stream, runs handlers, acks.

Loop: reclaim one stale entry (its worker died: idle > ``lease_s``), else read a new one. While a
handler runs, a heartbeat thread extends the entry's lease every ``lease_s / 3`` (owner-checked, so
a worker that lost its lease learns it and stops instead of racing its replacement). The entry is
acked only after the job's terminal state is written, so a crash anywhere before that means the job
runs again elsewhere. A Redis outage never kills the loop: it backs off and retries.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from sith.engine.errors import InvalidInput
from sith_workers import metrics
from sith_workers.cache import DEFAULT_TTL_S, RedisArtifactCache
from sith_workers.connection import RedisUnavailable, connect
from sith_workers.edits import EditStore
from sith_workers.errors import job_status
from sith_workers.handlers import HANDLERS, EditGone, JobCancelled, JobContext, JobLost, WorkerStopping
from sith_workers.models import LRU, ModelNotFound, ModelPool, ModelRegistry
from sith_workers.queue import Delivery, JobQueue, JobRecord, JobTimedOut, QuotaExceeded, encode_error

log = logging.getLogger("sith.worker")
ANNOUNCE_EVERY_S = 5.0
PRUNE_EVERY_S = 600.0


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    device: str = "cpu"
    prefix: str = "sith"
    cache_ttl_s: int = DEFAULT_TTL_S
    lease_s: float = 60.0            # an entry idle this long belongs to a dead worker
    max_attempts: int = 3            # deliveries before a job that keeps crashing workers fails
    block_ms: int = 1000
    model_capacity: int = 3
    plugins: tuple[str, ...] = field(default_factory=tuple)
    pool_size: int = 1               # torch processes started together: they share the idle cores
    # Exported edit checkpoints go under data_dir/edits (shared with the server, which streams them).
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("SITH_DATA_DIR") or "~/.cache/sith").expanduser())

    @classmethod
    def from_env(cls, redis_url: str, **overrides) -> WorkerSettings:
        ttl = int(os.environ.get("SITH_CACHE_TTL_S", "") or DEFAULT_TTL_S)
        return cls(redis_url=redis_url, cache_ttl_s=ttl, **overrides)


def stored_result(result: Message | dict) -> dict:
    """The JSON form a result is kept in on the job record: a message as its google.protobuf.Any
    (canonical JSON, with "@type"), a plain dict as is (served as a google.protobuf.Struct)."""
    if isinstance(result, Message):
        packed = any_pb2.Any()
        packed.Pack(result)
        return json_format.MessageToDict(packed, preserving_proto_field_name=True)
    json.dumps(result)          # TypeError/ValueError if it is not JSON
    return result


def consumer_name(device: str) -> str:
    """Unique per process and readable in XINFO: host:pid:device."""
    return f"{socket.gethostname()}:{os.getpid()}:{device}"


class Worker:
    def __init__(self, settings: WorkerSettings, client: redis.Redis | None = None,
                 consumer: str | None = None) -> None:
        self.settings = settings
        self.redis = client or connect(settings.redis_url)
        self.consumer = consumer or consumer_name(settings.device)
        self.queue = JobQueue(self.redis, settings.prefix)
        # Locks live one lease and are extended by the heartbeat: a dead worker's keys free up as fast
        # as its job is reclaimed.
        self.cache = RedisArtifactCache(self.redis, settings.prefix, settings.cache_ttl_s,
                                        lock_timeout_s=settings.lease_s)
        self.models = ModelPool(settings.device, settings.model_capacity, ModelRegistry(self.redis, settings.prefix))
        self.edits = EditStore(self.redis, settings.prefix)
        self.analyzers: LRU = LRU(settings.model_capacity + 1)
        self.stopping = threading.Event()
        self.processed = 0

    # ---- loop ---------------------------------------------------------------------------------
    def run(self, max_jobs: int | None = None) -> None:
        """Process jobs until ``stop()`` (or ``max_jobs`` deliveries, for tests)."""
        backoff = 0.5
        lease_ms = int(self.settings.lease_s * 1000)
        grouped = False
        announced = 0.0
        pruned = time.monotonic()
        while not self.stopping.is_set() and (max_jobs is None or self.processed < max_jobs):
            try:
                if not grouped:
                    self.queue.ensure_group()
                    grouped = True
                if time.monotonic() - announced > ANNOUNCE_EVERY_S:
                    self.queue.announce(self.consumer, {"device": self.settings.device, "pid": os.getpid(),
                                                        "host": socket.gethostname()})
                    announced = time.monotonic()
                if time.monotonic() - pruned > PRUNE_EVERY_S:
                    self.queue.prune()
                    pruned = time.monotonic()
                deliveries = self.queue.reclaim(self.consumer, lease_ms) or \
                    self.queue.fetch(self.consumer, self.settings.block_ms)
                for delivery in deliveries:
                    self.process(delivery)
                backoff = 0.5
            except RedisUnavailable as exc:
                log.warning("%s; retrying in %.1fs", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:                     # never let one bad entry kill the worker: it stays
                log.exception("worker loop error")   # pending, is reclaimed, and fails after max_attempts
                self.stopping.wait(1.0)
        try:
            self.queue.retire(self.consumer)
        except RedisUnavailable:
            pass

    def stop(self) -> None:
        """Finish soon: the running job is requeued at its next step, the loop then exits."""
        self.stopping.set()

    # ---- one job ------------------------------------------------------------------------------
    def process(self, delivery: Delivery) -> None:
        self.processed += 1
        record = self.queue.start(delivery.job_id, self.consumer, self.settings.max_attempts)
        if record is None:                    # finished, cancelled, unknown, or given up
            self._settle_edit(self.queue.get(delivery.job_id))
            self.queue.ack(delivery)
            return
        handler = HANDLERS.get(record.kind)
        if handler is None:
            self._finish(record, delivery, "failed", error=encode_error(
                "unimplemented", f"unknown job kind {record.kind!r}; known: {sorted(HANDLERS)}"))
            return
        ctx = JobContext(job=record, queue=self.queue, cache=self.cache, models=self.models, edits=self.edits,
                         device=self.settings.device, data_dir=self.settings.data_dir, analyzers=self.analyzers,
                         stopping=self.stopping)
        done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(delivery, ctx, done), daemon=True)
        heartbeat.start()
        started = time.monotonic()
        log.info("job %s (%s) attempt %d", record.id, record.kind, record.attempts)
        try:
            result = handler(ctx, record.payload)
        except (JobCancelled, EditGone):
            self._finish(record, delivery, "cancelled")
        except JobLost:
            log.warning("job %s was reclaimed or finished by another worker; dropping this run", record.id)
        except JobTimedOut as exc:            # its kind's time limit (issue 15)
            self._finish(record, delivery, "failed", error=encode_error("deadline_exceeded", str(exc)))
        except WorkerStopping:
            self.queue.requeue(delivery, record)
        except ModelNotFound as exc:
            self._finish(record, delivery, "failed", error=encode_error("not_found", exc.reason, exc.field))
        except InvalidInput as exc:
            self._finish(record, delivery, "failed",
                         error=encode_error("invalid_argument", exc.reason, exc.field, exc.suggestions))
        except QuotaExceeded as exc:          # e.g. the tenant's artifact bytes (issue 15)
            self._finish(record, delivery, "failed", error={
                **encode_error("resource_exhausted", str(exc), exc.resource), "limit": exc.limit})
        except RedisUnavailable:
            raise                             # not acked: the job runs again once Redis is back
        except Exception as exc:              # a bug or an engine failure: report it on the job
            log.exception("job %s failed", record.id)
            self._finish(record, delivery, "failed", error=encode_error("internal", f"{type(exc).__name__}: {exc}"))
        else:
            try:
                stored = stored_result(result)
            except (TypeError, ValueError) as exc:
                self._finish(record, delivery, "failed", error=encode_error(
                    "internal", f"handler {record.kind!r} returned neither a message nor JSON: {exc}"))
            else:
                self._finish(record, delivery, "succeeded", result=stored)
        finally:
            done.set()
            heartbeat.join()
            self.cache.release_all()
            metrics.JOB_SECONDS.labels(kind=record.kind).observe(time.monotonic() - started)

    def _finish(self, record: JobRecord, delivery: Delivery, state: str, *, result: dict | None = None,
                error: dict | None = None) -> None:
        # the edit's record first (a crash here re-runs the job); not for a failure the queue retries
        if state != "succeeded" and not self.queue.will_retry(record, state, error):
            record.error = error
            self._settle_edit(record, state)
        self.queue.finish(record, state, result=result, error=error)  # type: ignore[arg-type]
        self.queue.ack(delivery)
        metrics.JOBS.labels(kind=record.kind, state=state).inc()
        log.info("job %s %s", record.id, state)

    def _settle_edit(self, record: JobRecord | None, state: str | None = None) -> None:
        """A failed, cancelled or abandoned edit job leaves its edit FAILED with the job's status."""
        if record is None or record.kind != "edit" or not record.payload.get("edit_id"):
            return
        state = state or record.state
        if state in ("failed", "cancelled"):
            self.edits.settle(record.tenant, record.payload["edit_id"], state, job_status(record.error, state))

    def _heartbeat(self, delivery: Delivery, ctx: JobContext, done: threading.Event) -> None:
        """Extend the lease until the job ends; flag the context if another worker took it."""
        interval = self.settings.lease_s / 3
        while not done.wait(interval):
            try:
                self.cache.extend_locks()
                if not self.queue.extend(self.consumer, delivery):
                    ctx.lost.set()
                    return
            except (RedisUnavailable, redis.RedisError) as exc:
                log.warning("lease extension failed: %s", exc)
