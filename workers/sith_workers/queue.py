"""Jobs on a Redis Stream: submission, records, progress events, cancellation, and delivery.

Layout (``p`` = prefix):

* ``p:jobs`` — the work stream; consumer group ``sith-workers``; each entry carries only a job id.
* ``p:job:{id}`` — the job record (hash): state, progress, message, payload/result/error as JSON.
* ``p:job:{id}:events`` — per-job progress stream (what the server streams to clients).
* ``p:tenant:{t}:jobs`` — sorted set of a tenant's job ids by creation time.
* ``p:dedupe:{t}:{key}`` — job id for a dedupe key (identical requests share one live job).
* ``p:workers`` — hash consumer -> JSON {device, host, pid, seen}: live workers announce themselves.

Delivery is at-least-once: an entry stays in the group's pending list until the worker that ran it
acks it; entries idle longer than a lease are reclaimed with XAUTOCLAIM, and live workers reset the
idle time of their entry (an owner-checked XCLAIM) so a slow job is never stolen. State changes go
through one Lua script so a late writer never overwrites a finished job.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from sith_workers.connection import outage_as_unavailable

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
GROUP = "sith-workers"
EVENTS_MAXLEN = 1000
DEFAULT_RECORD_TTL_S = 7 * 24 * 3600

# KEYS: record, events. ARGV: new state, allowed-from (comma list, "" = any), ttl (0 = keep),
# must_exist ("1"/"0"), n field pairs, fields..., event fields...
# Returns {1} when applied, {0, current state or ""} when refused.
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  if ARGV[4] == '1' then return {0, ''} end
elseif ARGV[2] ~= '' and not string.find(',' .. ARGV[2] .. ',', ',' .. state .. ',', 1, true) then
  return {0, state}
end
local n = tonumber(ARGV[5])
local fields = {}
for i = 6, 5 + 2 * n do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'state'
fields[#fields + 1] = ARGV[1]
redis.call('HSET', KEYS[1], unpack(fields))
local event = {}
for i = 6 + 2 * n, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', unpack(event))
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return {1}
"""

# KEYS: work stream. ARGV: group, consumer, entry id. Resets the entry's idle time only while
# this consumer still owns it (a plain XCLAIM would steal it back from a worker that reclaimed it).
# Returns 1 extended, 0 owned by another consumer, -1 no longer pending (acked, or Redis flushed).
_EXTEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not ok or #p == 0 then return -1 end
if p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


# KEYS: record, events. ARGV: n, n field pairs of the whole record (less state/cancel), event pairs.
# Progress of a running job; a record lost to a flush is restored whole (never left partial).
# Returns "finished" (another run already ended it), "cancel" (cancellation requested) or "ok".
_PROGRESS = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 'finished' end
local n = tonumber(ARGV[1])
local fields = {}
for i = 2, 1 + 2 * n do fields[#fields + 1] = ARGV[i] end
if not state then
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = 'running'
  redis.call('HSET', KEYS[1], unpack(fields))
else
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f == 'progress' or f == 'message' or f == 'updated' then
      redis.call('HSET', KEYS[1], f, fields[i + 1])
    end
  end
end
local event = {}
for i = 2 + 2 * n, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', unpack(event))
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'cancel' end
return 'ok'
"""


class JobNotFound(KeyError):
    """No record for this job id (never submitted, expired, or its Redis was flushed)."""


@dataclass
class JobRecord:
    id: str
    kind: str
    tenant: str
    state: State = "queued"
    progress: float = 0.0
    message: str = ""
    result: dict | None = None
    error: dict | None = None      # {"code", "reason", "field"?, "suggestions"?}
    created: float = 0.0
    updated: float = 0.0
    payload: dict = field(default_factory=dict)
    attempts: int = 0
    cancel_requested: bool = False
    worker: str = ""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def to_hash(self) -> dict[str, str]:
        return {
            "id": self.id, "kind": self.kind, "tenant": self.tenant, "state": self.state,
            "progress": repr(float(self.progress)), "message": self.message,
            "result": json.dumps(self.result), "error": json.dumps(self.error),
            "created": repr(self.created), "updated": repr(self.updated),
            "payload": json.dumps(self.payload), "attempts": str(self.attempts),
            "cancel": "1" if self.cancel_requested else "0", "worker": self.worker,
        }

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=h["id"], kind=h["kind"], tenant=h["tenant"], state=h["state"],  # type: ignore[arg-type]
            progress=float(h.get("progress", 0)), message=h.get("message", ""),
            result=json.loads(h.get("result", "null")), error=json.loads(h.get("error", "null")),
            created=float(h.get("created", 0)), updated=float(h.get("updated", 0)),
            payload=json.loads(h.get("payload", "{}")), attempts=int(h.get("attempts", 0)),
            cancel_requested=h.get("cancel") == "1", worker=h.get("worker", ""),
        )


@dataclass(frozen=True)
class ProgressEvent:
    id: str              # stream entry id; pass as ``after`` to resume
    job_id: str
    state: State
    progress: float
    message: str
    time: float

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a worker: ack ``message_id`` when the job is finished."""

    message_id: str
    job_id: str


class JobQueue:
    """The jobs contract shared by the server (submit/get/cancel/events) and workers (the rest)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "sith",
                 record_ttl_s: int = DEFAULT_RECORD_TTL_S) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.stream = f"{prefix}:jobs"
        self.workers_key = f"{prefix}:workers"
        self.record_ttl_s = record_ttl_s
        self._transition = redis_client.register_script(_TRANSITION)
        self._extend = redis_client.register_script(_EXTEND)
        self._progress = redis_client.register_script(_PROGRESS)

    # ---- keys ---------------------------------------------------------------------------------
    def record_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def _tenant_key(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def _dedupe_key(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:dedupe:{tenant}:{key}"

    # ---- client side --------------------------------------------------------------------------
    def submit(self, kind: str, payload: dict, tenant: str, dedupe_key: str | None = None) -> JobRecord:
        """Queue a job; with ``dedupe_key``, a live (queued/running/succeeded) job of the same
        tenant and key is returned instead of queueing a second one."""
        now = time.time()
        record = JobRecord(id=uuid.uuid4().hex, kind=kind, tenant=tenant, created=now, updated=now,
                           payload=payload, message="queued")
        with outage_as_unavailable(self.redis):
            if dedupe_key is None:
                pipe = self.redis.pipeline(transaction=True)
                self._queue_commands(pipe, record)
                pipe.execute()
                return record
            dkey = self._dedupe_key(tenant, dedupe_key)
            while True:
                with self.redis.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(dkey)
                        existing_id = pipe.get(dkey)
                        if existing_id is not None:
                            existing = self.get(existing_id.decode())
                            if existing is not None and existing.state not in ("failed", "cancelled"):
                                return existing
                        pipe.multi()
                        pipe.set(dkey, record.id, ex=self.record_ttl_s)
                        self._queue_commands(pipe, record)
                        pipe.execute()
                        return record
                    except redis.WatchError:
                        continue

    def _queue_commands(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        pipe.hset(self.record_key(record.id), mapping=record.to_hash())
        pipe.xadd(self.events_key(record.id), self._event_fields(record), maxlen=EVENTS_MAXLEN)
        pipe.zadd(self._tenant_key(record.tenant), {record.id: record.created})
        pipe.xadd(self.stream, {"job": record.id})

    def get(self, job_id: str) -> JobRecord | None:
        with outage_as_unavailable(self.redis):
            raw = self.redis.hgetall(self.record_key(job_id))
        # Records are only ever written whole; the check guards against hand-edited keys.
        return JobRecord.from_hash(raw) if raw and b"state" in raw and b"id" in raw else None

    def list(self, tenant: str, limit: int = 100) -> list[JobRecord]:
        """The tenant's most recent jobs, newest first (expired records are skipped)."""
        with outage_as_unavailable(self.redis):
            ids = self.redis.zrevrange(self._tenant_key(tenant), 0, limit - 1)
        records = [self.get(i.decode()) for i in ids]
        return [r for r in records if r is not None]

    def cancel(self, job_id: str) -> JobRecord:
        """Request cancellation: a queued job is cancelled at once, a running one when its handler
        next checks (between steps); a finished job is returned unchanged."""
        key = self.record_key(job_id)
        with outage_as_unavailable(self.redis):
            with self.redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        state = pipe.hget(key, "state")
                        if state is None:
                            raise JobNotFound(job_id)
                        if state.decode() in TERMINAL:
                            break
                        pipe.multi()
                        pipe.hset(key, mapping={"cancel": "1", "updated": repr(time.time())})
                        pipe.execute()
                        break
                    except redis.WatchError:
                        continue
            self._apply(job_id, "cancelled", allowed=("queued",), must_exist=True,
                        fields={"message": "cancelled before it started"})
        record = self.get(job_id)
        if record is None:
            raise JobNotFound(job_id)
        return record

    def events(self, job_id: str, timeout_s: float, after: str = "0") -> Iterator[ProgressEvent]:
        """Progress events from ``after`` until the job finishes or ``timeout_s`` passes.

        Ends after the terminal event. When the event stream is gone (expired/flushed) but the
        record says the job is done, one event is synthesised from the record.
        """
        deadline = time.monotonic() + timeout_s
        key = self.events_key(job_id)
        last = after
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with outage_as_unavailable(self.redis):
                reply = self.redis.xread({key: last}, count=100, block=max(1, int(min(remaining, 1.0) * 1000)))
            if not reply:
                record = self.get(job_id)
                if record is None:
                    raise JobNotFound(job_id)
                if record.done:
                    yield ProgressEvent(id=last, job_id=job_id, state=record.state, progress=record.progress,
                                        message=record.message, time=record.updated)
                    return
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id.decode()
                event = self._parse_event(job_id, last, fields)
                yield event
                if event.done:
                    return

    def workers(self, max_age_s: float = 30.0) -> dict[str, dict]:
        """Workers that announced themselves within ``max_age_s`` (consumer -> info)."""
        with outage_as_unavailable(self.redis):
            raw = self.redis.hgetall(self.workers_key)
        now = time.time()
        live = {k.decode(): json.loads(v) for k, v in raw.items()}
        return {k: v for k, v in live.items() if now - v.get("seen", 0) <= max_age_s}

    def depth(self) -> int:
        """Jobs waiting or running (finished entries are deleted from the stream)."""
        with outage_as_unavailable(self.redis):
            return int(self.redis.xlen(self.stream))

    # ---- worker side --------------------------------------------------------------------------
    def announce(self, consumer: str, info: dict) -> None:
        """Record that this worker is alive (readiness for ``sith serve``, health, tests)."""
        with outage_as_unavailable(self.redis):
            self.redis.hset(self.workers_key, consumer, json.dumps({**info, "seen": time.time()}))

    def prune(self, max_idle_s: float = 3600.0) -> list[str]:
        """Drop consumers of dead workers: no pending entries and idle for ``max_idle_s`` (worker
        names are per process, so they would pile up). Removing an idle live consumer is harmless:
        its next read recreates it. Returns the names removed."""
        removed = []
        with outage_as_unavailable(self.redis):
            try:
                consumers = self.redis.xinfo_consumers(self.stream, GROUP)
            except redis.ResponseError:
                return []
            for c in consumers:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) >= max_idle_s * 1000:
                    self.redis.xgroup_delconsumer(self.stream, GROUP, name)
                    removed.append(name)
            now = time.time()
            for name, raw in self.redis.hgetall(self.workers_key).items():
                if now - json.loads(raw).get("seen", 0) >= max_idle_s:
                    self.redis.hdel(self.workers_key, name)
        return removed

    def retire(self, consumer: str) -> None:
        """Forget a stopping worker (its consumer stays in the group until its entries are acked)."""
        with outage_as_unavailable(self.redis):
            self.redis.hdel(self.workers_key, consumer)

    def ensure_group(self) -> None:
        """Create the stream and consumer group if missing (first start, or after a flush)."""
        with outage_as_unavailable(self.redis):
            try:
                self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def fetch(self, consumer: str, block_ms: int = 1000) -> list[Delivery]:
        """Next new entry for this consumer (blocks up to ``block_ms``)."""
        with outage_as_unavailable(self.redis):
            try:
                reply = self.redis.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.ensure_group()
                return []
        return [self._delivery(i, f) for _, entries in (reply or []) for i, f in entries]

    def reclaim(self, consumer: str, min_idle_ms: int) -> list[Delivery]:
        """Take over one entry whose owner has not extended its lease for ``min_idle_ms``."""
        with outage_as_unavailable(self.redis):
            try:
                reply = self.redis.xautoclaim(self.stream, GROUP, consumer, min_idle_ms, start_id="0-0", count=1)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.ensure_group()
                return []
        claimed = reply[1]
        return [self._delivery(i, f) for i, f in claimed if f]

    def extend(self, consumer: str, delivery: Delivery) -> bool:
        """Reset the entry's idle time (the lease); False only if another worker has reclaimed it
        (an entry that vanished, e.g. in a flush, leaves the job to finish and rewrite its record)."""
        with outage_as_unavailable(self.redis):
            return int(self._extend(keys=[self.stream], args=[GROUP, consumer, delivery.message_id])) != 0

    def ack(self, delivery: Delivery) -> None:
        """Finished (whatever the outcome): drop the entry from the pending list and the stream."""
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(self.stream, GROUP, delivery.message_id)
            pipe.xdel(self.stream, delivery.message_id)
            pipe.execute()

    def requeue(self, delivery: Delivery, record: JobRecord) -> None:
        """Give a started job back to the queue (worker shutting down): new entry, state queued."""
        record.message = "requeued (worker stopped)"
        fields = {k: v for k, v in record.to_hash().items() if k not in ("state", "cancel")}
        if not self._apply(record.id, "queued", allowed=("running",), fields=fields):
            self.ack(delivery)                # it finished meanwhile: nothing to give back
            return
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(self.stream, {"job": delivery.job_id})
            pipe.xack(self.stream, GROUP, delivery.message_id)
            pipe.xdel(self.stream, delivery.message_id)
            pipe.execute()

    def start(self, job_id: str, consumer: str, max_attempts: int) -> JobRecord | None:
        """Mark a delivered job running; None if it needs no run (finished, cancelled, unknown,
        or failed for exceeding ``max_attempts`` — a job that keeps killing its workers)."""
        record = self.get(job_id)
        if record is None or record.done:
            return None
        if record.cancel_requested:
            self._apply(job_id, "cancelled", allowed=("queued", "running"), fields={"message": "cancelled"})
            return None
        if record.attempts >= max_attempts:
            self.finish(record, "failed", error={
                "code": "internal",
                "reason": f"gave up after {record.attempts} attempts (the worker running it stopped each time)"})
            return None
        record.attempts += 1
        record.state, record.worker, record.message = "running", consumer, "started"
        record.updated = time.time()
        applied = self._apply(job_id, "running", allowed=("queued", "running"), must_exist=True,
                              fields={k: v for k, v in record.to_hash().items() if k not in ("state", "cancel")})
        return record if applied else None

    def progress(self, record: JobRecord, fraction: float, message: str) -> Literal["ok", "cancel", "finished"]:
        """Report progress of a running job: "cancel" if cancellation was requested, "finished"
        if another run of it has already ended it (a reclaimed duplicate), else "ok"."""
        record.progress, record.message, record.updated = float(fraction), message, time.time()
        fields = {k: v for k, v in record.to_hash().items() if k not in ("state", "cancel")}
        args: list[str] = [str(len(fields))]
        for k, v in fields.items():
            args += [k, v]
        for k, v in self._event_fields(record).items():
            args += [k, v]
        with outage_as_unavailable(self.redis):
            reply = self._progress(keys=[self.record_key(record.id), self.events_key(record.id)], args=args)
        return reply.decode() if isinstance(reply, bytes) else reply

    def finish(self, record: JobRecord, state: State, *, result: dict | None = None,
               error: dict | None = None, message: str | None = None) -> bool:
        """Write a terminal state (rewriting the whole record, so a flushed record comes back);
        False if the job had already finished (e.g. a reclaimed duplicate got there first)."""
        record.state, record.result, record.error = state, result, error
        if state == "succeeded":
            record.progress = 1.0
        record.message = message or {"succeeded": "done", "failed": (error or {}).get("reason", "failed"),
                                     "cancelled": "cancelled"}.get(state, state)
        record.updated = time.time()
        fields = {k: v for k, v in record.to_hash().items() if k != "state"}
        return self._apply(record.id, state, allowed=("queued", "running"), fields=fields)

    # ---- internals ----------------------------------------------------------------------------
    def _apply(self, job_id: str, state: str, *, allowed: tuple[str, ...], fields: dict[str, str],
               must_exist: bool = False) -> bool:
        fields = {"updated": repr(time.time()), **fields}
        snapshot = {"state": state, "progress": fields.get("progress", ""), "message": fields.get("message", ""),
                    "time": fields["updated"]}
        args: list[str] = [state, ",".join(allowed), str(self.record_ttl_s if state in TERMINAL else 0),
                           "1" if must_exist else "0", str(len(fields))]
        for k, v in fields.items():
            args += [k, v]
        for k, v in snapshot.items():
            args += [k, v]
        with outage_as_unavailable(self.redis):
            reply = self._transition(keys=[self.record_key(job_id), self.events_key(job_id)], args=args)
        return bool(reply[0])

    @staticmethod
    def _event_fields(record: JobRecord) -> dict[str, str]:
        return {"state": record.state, "progress": repr(float(record.progress)), "message": record.message,
                "time": repr(record.updated)}

    @staticmethod
    def _parse_event(job_id: str, entry_id: str, fields: dict[bytes, bytes]) -> ProgressEvent:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        return ProgressEvent(id=entry_id, job_id=job_id, state=f["state"],  # type: ignore[arg-type]
                             progress=float(f["progress"] or 0), message=f.get("message", ""),
                             time=float(f.get("time") or 0))

    @staticmethod
    def _delivery(entry_id: bytes, fields: dict[bytes, bytes]) -> Delivery:
        return Delivery(message_id=entry_id.decode(), job_id=fields[b"job"].decode())


def encode_error(code: str, reason: str, field: str | None = None, suggestions: list[str] | None = None) -> dict[str, Any]:
    """The error dict stored on failed jobs (``code`` is a gRPC-style name the server maps)."""
    error: dict[str, Any] = {"code": code, "reason": reason}
    if field is not None:
        error["field"] = field
    if suggestions:
        error["suggestions"] = list(suggestions)
    return error
