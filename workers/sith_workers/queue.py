"""Jobs on a Redis Stream: submission, records, progress events, cancellation, and delivery.

Layout (``p`` = prefix, ``t`` = tenant):

* ``p:jobs`` — the work stream; consumer group ``sith-workers``. Each entry is a *ticket* (``{"t": "1"}``)
  that a worker binds to one queued job when it reads it; entries written by older releases (or by
  hand) carry ``{"job": id}`` and are bound to that job. One ticket is added per queued job.
* ``p:lane:{t}`` — the tenant's queued job ids, FIFO; ``p:lanes`` — tenants that may have queued jobs,
  in service order; ``p:running:{t}`` — set of the tenant's bound (running) job ids.
* ``p:ticket:{entry}`` — hash {job, tenant}: which job a stream entry was bound to (kept until acked,
  so a worker that reclaims the entry runs the same job).
* ``p:leases`` — sorted set entry -> time of its owner's last heartbeat (the injectable clock's time).
* ``p:delayed`` — sorted set job id -> time it may run again (retries after a transient error).
* ``p:dead`` — dead-letter stream: jobs that exhausted their attempts (id, tenant, kind, reason).
* ``p:job:{id}`` — the job record (hash): state, progress, message, payload/result/error as JSON.
* ``p:job:{id}:events`` — per-job progress stream (what the server streams to clients).
* ``p:tenant:{t}:jobs`` — sorted set of a tenant's job ids by creation time.
* ``p:dedupe:{t}:{key}`` — job id for a dedupe key (identical requests share one live job).
* ``p:workers`` — hash consumer -> JSON {device, host, pid, seen}: live workers announce themselves.

Fair scheduling: binding a ticket picks, among tenants with queued jobs and fewer running jobs than
their quota, the one with the fewest running jobs (ties: the one served longest ago), so a tenant that
queued 40 jobs cannot make another tenant's one job wait behind them. Quotas (queued, running, stored
edits) come from :class:`QueueLimits`; submit raises :class:`QuotaExceeded`.

Delivery is at-least-once: an entry stays in the group's pending list until the worker that ran it
acks it; entries idle longer than a lease are reclaimed (by the lease clock, or by XAUTOCLAIM for
entries without one), and live workers reset their lease (owner-checked) so a slow job is never
stolen. Each job kind has a time limit; a job over it fails with ``deadline_exceeded`` at its next
step. Handler errors that are transient (GPU out of memory, a Redis blip) are retried with exponential
backoff; a job that exhausts its attempts fails and is copied to the dead-letter stream. State changes
go through Lua scripts so a late writer never overwrites a finished job.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis

from sith_workers.connection import API_BLOCK_MS, outage_as_unavailable

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
GROUP = "sith-workers"
EVENTS_MAXLEN = 1000
DEFAULT_RECORD_TTL_S = 7 * 24 * 3600
DEAD_MAXLEN = 10_000
RETRY_BASE_S = 2.0           # transient-error retries wait 2, 4, 8 ... s (capped at RETRY_MAX_S)
RETRY_MAX_S = 60.0
DEFER_S = 0.2                # a worker whose ticket found no eligible job waits this long
# Failures worth another attempt: the device or Redis, not the request.
TRANSIENT_MARKERS = ("OutOfMemoryError", "out of memory", "CUDA error: out of memory", "RedisUnavailable",
                     "ConnectionError", "TimeoutError", "RedisFull")
DEFAULT_JOB_TIME_LIMITS_S = {"decompose": 900, "explain": 1800, "find": 900, "edit": 1800}


class Clock(Protocol):
    """Time source of leases, deadlines and retry backoff (tests inject a fake one and never sleep)."""

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class QuotaExceeded(RuntimeError):
    """A tenant hit a quota (``queued_jobs``, ``running_jobs``, ``stored_edits``, ``artifact_bytes``).

    The server maps it to RESOURCE_EXHAUSTED with a QuotaFailure naming the resource and limit.
    """

    def __init__(self, resource: str, limit: int, tenant: str) -> None:
        self.resource = resource
        self.limit = int(limit)
        self.tenant = tenant
        super().__init__(f"tenant {tenant!r} reached its quota of {limit} {resource.replace('_', ' ')}")


class JobTimedOut(RuntimeError):
    """A running job passed its kind's time limit; the worker fails it with ``deadline_exceeded``."""

    def __init__(self, kind: str, limit_s: int) -> None:
        self.kind = kind
        self.limit_s = limit_s
        super().__init__(f"the {kind} job ran longer than its time limit of {limit_s}s and was stopped")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class QueueLimits:
    """Per-tenant quotas and per-kind time limits (same variables as the server's Limits)."""

    max_queued_jobs: int = 32
    max_running_jobs: int = 4
    max_edits: int = 1000
    max_artifact_bytes: int = 8 * 2**30
    job_time_limit_s: int = 3600
    job_time_limits_s: tuple[tuple[str, int], ...] = tuple(sorted(DEFAULT_JOB_TIME_LIMITS_S.items()))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> QueueLimits:
        env = os.environ if env is None else env
        limits = dict(DEFAULT_JOB_TIME_LIMITS_S)
        for part in filter(None, (x.strip() for x in env.get("SITH_JOB_TIME_LIMITS", "").split(","))):
            kind, _, seconds = part.partition("=")
            limits[kind.strip()] = int(seconds)
        d = cls()
        return cls(max_queued_jobs=_env_int(env, "SITH_MAX_QUEUED_JOBS", d.max_queued_jobs),
                   max_running_jobs=_env_int(env, "SITH_MAX_RUNNING_JOBS", d.max_running_jobs),
                   max_edits=_env_int(env, "SITH_MAX_EDITS", d.max_edits),
                   max_artifact_bytes=_env_int(env, "SITH_MAX_ARTIFACT_BYTES", d.max_artifact_bytes),
                   job_time_limit_s=_env_int(env, "SITH_JOB_TIME_LIMIT_S", d.job_time_limit_s),
                   job_time_limits_s=tuple(sorted(limits.items())))

    def time_limit(self, kind: str) -> int:
        return dict(self.job_time_limits_s).get(kind, self.job_time_limit_s)


def is_transient(error: dict | None) -> bool:
    """An ``internal`` failure caused by the device or Redis (retried with backoff), not by the request."""
    if not error or error.get("code") != "internal":
        return False
    reason = str(error.get("reason", ""))
    return any(marker in reason for marker in TRANSIENT_MARKERS)


# KEYS: record, events, tenant jobs zset, lane, lanes, stream, dedupe key, edits index.
# ARGV: prefix, tenant, job id, dedupe ("1"/"0"), dedupe ttl, max queued, max edits (0 = not an edit),
#       n field pairs, fields..., event fields...
# Returns {1, id} queued, {0, existing id} deduplicated, {-1, resource, limit} over a quota.
_SUBMIT = """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[7])
  if existing then
    local st = redis.call('HGET', ARGV[1] .. ':job:' .. existing, 'state')
    if st and st ~= 'failed' and st ~= 'cancelled' then return {0, existing} end
  end
end
local max_queued = tonumber(ARGV[6])
if redis.call('LLEN', KEYS[4]) >= max_queued then return {-1, 'queued_jobs', max_queued} end
local max_edits = tonumber(ARGV[7])
if max_edits > 0 and redis.call('ZCARD', KEYS[8]) >= max_edits then return {-1, 'stored_edits', max_edits} end
local n = tonumber(ARGV[8])
local fields = {}
for i = 9, 8 + 2 * n do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local event = {}
for i = 9 + 2 * n, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', unpack(event))
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created'), ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[3])
if not redis.call('LPOS', KEYS[5], ARGV[2]) then redis.call('RPUSH', KEYS[5], ARGV[2]) end
redis.call('XADD', KEYS[6], '*', 't', '1')
if ARGV[4] == '1' then redis.call('SET', KEYS[7], ARGV[3], 'EX', tonumber(ARGV[5])) end
return {1, ARGV[3]}
"""

# KEYS: lanes, delayed. ARGV: prefix, entry id, direct job id ("" for a ticket), now, max running.
# Binds the entry to a job. Returns {"job", id, tenant}, {"wait"} (jobs queued but none eligible now)
# or {"empty"} (nothing queued: a surplus ticket).
_BIND = """
local p = ARGV[1]
local tkey = p .. ':ticket:' .. ARGV[2]
local bound = redis.call('HMGET', tkey, 'job', 'tenant')
if bound[1] then return {'job', bound[1], bound[2] or ''} end
local function bind(job, tenant)
  redis.call('HSET', tkey, 'job', job, 'tenant', tenant)
  if tenant ~= '' then redis.call('SADD', p .. ':running:' .. tenant, job) end
  if redis.call('EXISTS', p .. ':job:' .. job) == 1 then
    redis.call('HSET', p .. ':job:' .. job, 'ticket', ARGV[2])
  end
  return {'job', job, tenant}
end
if ARGV[3] ~= '' then
  local tenant = redis.call('HGET', p .. ':job:' .. ARGV[3], 'tenant') or ''
  if tenant ~= '' then redis.call('LREM', p .. ':lane:' .. tenant, 0, ARGV[3]) end
  return bind(ARGV[3], tenant)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
for _, job in ipairs(due) do
  redis.call('ZREM', KEYS[2], job)
  local tenant = redis.call('HGET', p .. ':job:' .. job, 'tenant')
  if tenant then
    redis.call('LPUSH', p .. ':lane:' .. tenant, job)
    if not redis.call('LPOS', KEYS[1], tenant) then redis.call('RPUSH', KEYS[1], tenant) end
  end
end
local max_running = tonumber(ARGV[5])
local best, best_running = nil, nil
local waiting = false
for _, tenant in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if redis.call('LLEN', p .. ':lane:' .. tenant) == 0 then
    redis.call('LREM', KEYS[1], 0, tenant)
  else
    waiting = true
    local running = redis.call('SCARD', p .. ':running:' .. tenant)
    if running < max_running and (best == nil or running < best_running) then
      best, best_running = tenant, running
    end
  end
end
if best == nil then
  if waiting or redis.call('ZCARD', KEYS[2]) > 0 then return {'wait'} end
  return {'empty'}
end
local job = redis.call('LPOP', p .. ':lane:' .. best)
redis.call('LREM', KEYS[1], 0, best)
if redis.call('LLEN', p .. ':lane:' .. best) > 0 then redis.call('RPUSH', KEYS[1], best) end
return bind(job, best)
"""

# KEYS: stream. ARGV: prefix, group, entry id. Acks and forgets the entry and its binding.
_ACK = """
local tkey = ARGV[1] .. ':ticket:' .. ARGV[3]
local bound = redis.call('HMGET', tkey, 'job', 'tenant')
if bound[1] and bound[2] and bound[2] ~= '' then
  redis.call('SREM', ARGV[1] .. ':running:' .. bound[2], bound[1])
end
redis.call('DEL', tkey)
redis.call('ZREM', ARGV[1] .. ':leases', ARGV[3])
redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# KEYS: stream, leases. ARGV: group, consumer, now, older-than. Takes over one entry whose lease (by the
# queue's clock) is older than ARGV[4]; returns its id or false.
_RECLAIM = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[4], 'LIMIT', 0, 1)
if #stale == 0 then return false end
local entry = stale[1]
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
if #claimed == 0 then
  redis.call('ZREM', KEYS[2], entry)
  return false
end
redis.call('ZADD', KEYS[2], ARGV[3], entry)
return entry
"""

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
    deadline: float = 0.0          # this attempt must end by then (queue clock); 0 = not running
    max_attempts: int = 0          # of the current run (set by start; retries of transient errors)

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
            "deadline": repr(float(self.deadline)), "max_attempts": str(self.max_attempts),
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
            deadline=float(h.get("deadline") or 0), max_attempts=int(h.get("max_attempts") or 0),
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
                 record_ttl_s: int = DEFAULT_RECORD_TTL_S, limits: QueueLimits | None = None,
                 clock: Clock | None = None) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.stream = f"{prefix}:jobs"
        self.workers_key = f"{prefix}:workers"
        self.lanes_key = f"{prefix}:lanes"
        self.delayed_key = f"{prefix}:delayed"
        self.leases_key = f"{prefix}:leases"
        self.dead_key = f"{prefix}:dead"
        self.record_ttl_s = record_ttl_s
        self.limits = limits or QueueLimits.from_env()
        self.clock = clock or SystemClock()
        self._transition = redis_client.register_script(_TRANSITION)
        self._extend = redis_client.register_script(_EXTEND)
        self._progress = redis_client.register_script(_PROGRESS)
        self._submit = redis_client.register_script(_SUBMIT)
        self._bind = redis_client.register_script(_BIND)
        self._ack = redis_client.register_script(_ACK)
        self._reclaim = redis_client.register_script(_RECLAIM)

    # ---- keys ---------------------------------------------------------------------------------
    def record_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def _tenant_key(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def _dedupe_key(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:dedupe:{tenant}:{key}"

    def lane_key(self, tenant: str) -> str:
        return f"{self.prefix}:lane:{tenant}"

    def running_key(self, tenant: str) -> str:
        return f"{self.prefix}:running:{tenant}"

    def edits_index_key(self, tenant: str) -> str:
        """The sorted set of a tenant's stored edits (counted against ``max_edits``): the index of
        ``sith_workers.edits.EditStore`` (same key)."""
        return f"{self.prefix}:tenant:{tenant}:edits"

    # ---- client side --------------------------------------------------------------------------
    def submit(self, kind: str, payload: dict, tenant: str, dedupe_key: str | None = None) -> JobRecord:
        """Queue a job; with ``dedupe_key``, a live (queued/running/succeeded) job of the same
        tenant and key is returned instead of queueing a second one.

        Raises QuotaExceeded when the tenant already has ``max_queued_jobs`` queued, or (an ``edit``
        that stores its result) ``max_edits`` stored edits.
        """
        now = self.clock.time()
        record = JobRecord(id=uuid.uuid4().hex, kind=kind, tenant=tenant, created=now, updated=now,
                           payload=payload, message="queued")
        stores_edit = kind == "edit" and not payload.get("dry_run")
        fields = record.to_hash()
        args: list[str] = [self.prefix, tenant, record.id, "1" if dedupe_key is not None else "0",
                           str(self.record_ttl_s), str(self.limits.max_queued_jobs),
                           str(self.limits.max_edits if stores_edit else 0), str(len(fields))]
        for k, v in fields.items():
            args += [k, v]
        for k, v in self._event_fields(record).items():
            args += [k, v]
        keys = [self.record_key(record.id), self.events_key(record.id), self._tenant_key(tenant),
                self.lane_key(tenant), self.lanes_key, self.stream,
                self._dedupe_key(tenant, dedupe_key or ""), self.edits_index_key(tenant)]
        with outage_as_unavailable(self.redis):
            reply = self._submit(keys=keys, args=args)
        status = int(reply[0])
        if status == -1:
            raise QuotaExceeded(_text(reply[1]), int(reply[2]), tenant)
        if status == 0:
            existing = self.get(_text(reply[1]))
            if existing is not None:
                return existing
            return self.submit(kind, payload, tenant, dedupe_key)   # expired in between: queue anew
        return record

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
            if self._apply(job_id, "cancelled", allowed=("queued",), must_exist=True,
                           fields={"message": "cancelled before it started"}):
                tenant = self.redis.hget(key, "tenant")
                if tenant is not None:           # frees its place in the tenant's queued quota
                    pipe = self.redis.pipeline(transaction=True)
                    pipe.lrem(self.lane_key(tenant.decode()), 0, job_id)
                    pipe.zrem(self.delayed_key, job_id)
                    pipe.execute()
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
                # Short blocks: the API client's read timeout (connect_api) must outlast each one.
                reply = self.redis.xread({key: last}, count=100,
                                         block=max(1, int(min(remaining * 1000, API_BLOCK_MS))))
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
        """Next job for this consumer (blocks up to ``block_ms``), chosen fairly across tenants.

        A ticket that finds queued jobs but none eligible (every such tenant at its running quota,
        or a retry not yet due) goes back to the end of the stream, and this call returns [] after a
        short pause; a surplus ticket (its job was cancelled) is dropped.
        """
        with outage_as_unavailable(self.redis):
            try:
                reply = self.redis.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):   # the stream was deleted
                    raise
                self.ensure_group()
                return []
        out = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                delivery = self._bind_entry(_text(entry_id), fields)
                if delivery is not None:
                    out.append(delivery)
        return out

    def _bind_entry(self, entry_id: str, fields: dict[bytes, bytes]) -> Delivery | None:
        """Bind a delivered entry to its job and start its lease; None if it was deferred/dropped."""
        direct = _text(fields.get(b"job", b""))
        with outage_as_unavailable(self.redis):
            reply = self._bind(keys=[self.lanes_key, self.delayed_key],
                               args=[self.prefix, entry_id, direct, repr(self.clock.time()),
                                     str(self.limits.max_running_jobs)])
            status = _text(reply[0])
            if status == "job":
                self.redis.zadd(self.leases_key, {entry_id: self.clock.time()})
                return Delivery(message_id=entry_id, job_id=_text(reply[1]))
            pipe = self.redis.pipeline(transaction=True)
            if status == "wait":
                pipe.xadd(self.stream, {"t": "1"})
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            pipe.execute()
        if status == "wait":
            self.clock.sleep(DEFER_S)
        return None

    def reclaim(self, consumer: str, min_idle_ms: int) -> list[Delivery]:
        """Take over one entry whose owner has not extended its lease for ``min_idle_ms`` (measured on
        the queue's clock; entries without a lease record fall back to Redis' own idle time)."""
        now = self.clock.time()
        with outage_as_unavailable(self.redis):
            try:
                entry = self._reclaim(keys=[self.stream, self.leases_key],
                                      args=[GROUP, consumer, repr(now), repr(now - min_idle_ms / 1000)])
                if entry:
                    claimed = self.redis.xrange(self.stream, _text(entry), _text(entry))
                else:
                    claimed = self.redis.xautoclaim(self.stream, GROUP, consumer, min_idle_ms,
                                                    start_id="0-0", count=1)[1]
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.ensure_group()
                return []
        out = []
        for entry_id, fields in claimed:
            if fields:
                delivery = self._bind_entry(_text(entry_id), fields)
                if delivery is not None:
                    out.append(delivery)
        return out

    def extend(self, consumer: str, delivery: Delivery) -> bool:
        """Reset the entry's lease; False only if another worker has reclaimed it (an entry that
        vanished, e.g. in a flush, leaves the job to finish and rewrite its record)."""
        with outage_as_unavailable(self.redis):
            owned = int(self._extend(keys=[self.stream], args=[GROUP, consumer, delivery.message_id]))
            if owned == 1:
                self.redis.zadd(self.leases_key, {delivery.message_id: self.clock.time()}, xx=True)
        return owned != 0

    def ack(self, delivery: Delivery) -> None:
        """Finished (whatever the outcome): drop the entry, its binding and lease, and the running mark."""
        with outage_as_unavailable(self.redis):
            self._ack(keys=[self.stream], args=[self.prefix, GROUP, delivery.message_id])

    def requeue(self, delivery: Delivery, record: JobRecord) -> None:
        """Give a started job back to the queue (worker shutting down): front of its lane, state queued."""
        record.message = "requeued (worker stopped)"
        fields = {k: v for k, v in record.to_hash().items() if k not in ("state", "cancel")}
        if not self._apply(record.id, "queued", allowed=("running",), fields=fields):
            self.ack(delivery)                # it finished meanwhile: nothing to give back
            return
        self._enqueue_again(record, delivery)

    def _enqueue_again(self, record: JobRecord, delivery: Delivery | None, due: float | None = None) -> None:
        """Put a job back in its lane (or the delayed set until ``due``) with a fresh ticket."""
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            if due is None:
                pipe.lpush(self.lane_key(record.tenant), record.id)
            else:
                pipe.zadd(self.delayed_key, {record.id: due})
            pipe.lrem(self.lanes_key, 0, record.tenant)
            pipe.lpush(self.lanes_key, record.tenant)
            pipe.xadd(self.stream, {"t": "1"})
            pipe.execute()
        if delivery is not None:
            self.ack(delivery)

    def start(self, job_id: str, consumer: str, max_attempts: int) -> JobRecord | None:
        """Mark a delivered job running; None if it needs no run (finished, cancelled, unknown,
        or failed for exceeding ``max_attempts`` — a job that keeps killing its workers; such a job
        is also written to the dead-letter stream)."""
        record = self.get(job_id)
        if record is None or record.done:
            return None
        if record.cancel_requested:
            self._apply(job_id, "cancelled", allowed=("queued", "running"), fields={"message": "cancelled"})
            return None
        if record.attempts >= max_attempts:
            reason = f"gave up after {record.attempts} attempts (the worker running it stopped each time)"
            if self.finish(record, "failed", error={"code": "internal", "reason": reason}):
                self._dead_letter(record, reason)
            return None
        now = self.clock.time()
        record.attempts += 1
        record.max_attempts = max_attempts
        record.deadline = now + self.limits.time_limit(record.kind)
        record.state, record.worker, record.message = "running", consumer, "started"
        record.updated = now
        applied = self._apply(job_id, "running", allowed=("queued", "running"), must_exist=True,
                              fields={k: v for k, v in record.to_hash().items() if k not in ("state", "cancel")})
        return record if applied else None

    def progress(self, record: JobRecord, fraction: float, message: str) -> Literal["ok", "cancel", "finished"]:
        """Report progress of a running job: "cancel" if cancellation was requested, "finished"
        if another run of it has already ended it (a reclaimed duplicate), else "ok".

        Raises JobTimedOut once the attempt is past its kind's time limit (the handler stops at its
        next step; the worker records the failure, so an edit's record is settled as for any failure).
        """
        if record.deadline and self.clock.time() > record.deadline:
            raise JobTimedOut(record.kind, self.limits.time_limit(record.kind))
        record.progress, record.message, record.updated = float(fraction), message, self.clock.time()
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
        False if the job had already finished (e.g. a reclaimed duplicate got there first).

        A transient failure (see :func:`is_transient`) of a run that has attempts left is not
        terminal: the job is queued again after an exponential backoff (True is returned, so the
        caller acks its delivery as usual). With no attempts left it fails and is dead-lettered.
        """
        if state == "failed" and is_transient(error) and record.max_attempts:
            if self.will_retry(record, state, error):
                return self._retry_later(record, error or {})
            error = {**(error or {}), "reason": f"{(error or {}).get('reason', '')} "
                     f"(gave up after {record.attempts} attempts)".strip()}
        record.state, record.result, record.error = state, result, error
        if state == "succeeded":
            record.progress = 1.0
        record.message = message or {"succeeded": "done", "failed": (error or {}).get("reason", "failed"),
                                     "cancelled": "cancelled"}.get(state, state)
        record.updated = self.clock.time()
        fields = {k: v for k, v in record.to_hash().items() if k != "state"}
        applied = self._apply(record.id, state, allowed=("queued", "running"), fields=fields)
        if applied and state == "failed" and is_transient(error) and record.max_attempts:
            self._dead_letter(record, str((error or {}).get("reason", "")))
        return applied

    @staticmethod
    def will_retry(record: JobRecord, state: str, error: dict | None) -> bool:
        """Whether :meth:`finish` with these arguments queues the job again instead of ending it
        (a transient failure with attempts left); callers keep the job's other records as they are."""
        return (state == "failed" and is_transient(error) and record.max_attempts > 0
                and record.attempts < record.max_attempts)

    def _retry_later(self, record: JobRecord, error: dict) -> bool:
        delay = min(RETRY_BASE_S * 2 ** max(record.attempts - 1, 0), RETRY_MAX_S)
        record.message = f"retrying in {delay:g}s after a transient error: {error.get('reason', '')}"[:500]
        record.deadline = 0.0
        fields = {k: v for k, v in record.to_hash().items() if k not in ("state", "cancel")}
        if not self._apply(record.id, "queued", allowed=("running",), fields=fields):
            return False
        record.state = "queued"
        self._enqueue_again(record, None, due=self.clock.time() + delay)
        return True

    def _dead_letter(self, record: JobRecord, reason: str) -> None:
        with outage_as_unavailable(self.redis):
            self.redis.xadd(self.dead_key, {"job": record.id, "tenant": record.tenant, "kind": record.kind,
                                            "attempts": str(record.attempts), "reason": reason[:1000],
                                            "time": repr(self.clock.time())},
                            maxlen=DEAD_MAXLEN, approximate=True)

    def dead_letters(self, tenant: str | None = None, count: int = 100) -> list[dict[str, str]]:
        """The most recent dead-lettered jobs, newest first (one tenant's, or all for operators)."""
        with outage_as_unavailable(self.redis):
            entries = self.redis.xrevrange(self.dead_key, count=count if tenant is None else max(count * 10, 1000))
        out = []
        for entry_id, fields in entries:
            item = {_text(k): _text(v) for k, v in fields.items()}
            if tenant is None or item.get("tenant") == tenant:
                out.append({"id": _text(entry_id), **item})
        return out[:count]

    def dead_letter_count(self) -> int:
        with outage_as_unavailable(self.redis):
            return int(self.redis.xlen(self.dead_key))

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """Queued and running jobs of a tenant (what the quotas count)."""
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=False)
            pipe.llen(self.lane_key(tenant))
            pipe.scard(self.running_key(tenant))
            queued, running = pipe.execute()
        return {"queued_jobs": int(queued), "running_jobs": int(running)}

    # ---- internals ----------------------------------------------------------------------------
    def _apply(self, job_id: str, state: str, *, allowed: tuple[str, ...], fields: dict[str, str],
               must_exist: bool = False) -> bool:
        fields = {"updated": repr(self.clock.time()), **fields}
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def encode_error(code: str, reason: str, field: str | None = None, suggestions: list[str] | None = None) -> dict[str, Any]:
    """The error dict stored on failed jobs (``code`` is a gRPC-style name the server maps)."""
    error: dict[str, Any] = {"code": code, "reason": reason}
    if field is not None:
        error["field"] = field
    if suggestions:
        error["suggestions"] = list(suggestions)
    return error
