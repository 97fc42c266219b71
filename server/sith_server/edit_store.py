"""What the server knows about an edit from the moment it is requested (before any worker ran).

The worker's ``sith_workers.editstore.EditStore`` holds the finished edit (multipliers, manifest,
plan) once the planning job succeeds; this store keeps the request side so an edit can be listed
and reported PENDING/FAILED while its job is queued, running or failed.

Layout (``p`` = prefix, ``t`` = tenant): ``p:tenant:{t}:editreq:{id}`` — spec (JSON), the model
reference the client used, base model hash, planning job id, create time;
``p:tenant:{t}:editreqs`` — sorted set of ids by create time. Keys are per tenant, so another
tenant's edit simply does not exist.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis

from sith_server.errors import NotFound
from sith_workers.connection import outage_as_unavailable


@dataclass
class EditRecord:
    id: str
    tenant: str
    spec: dict
    model: str             # the model reference as the client gave it
    model_hash: str
    job_id: str
    created: float


REQUEST_ID_TTL_S = 24 * 3600


class EditStore:
    def __init__(self, redis_client: redis.Redis, prefix: str = "sith") -> None:
        self.redis = redis_client
        self.prefix = prefix

    def _key(self, tenant: str, edit_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:editreq:{edit_id}"

    def _index(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:editreqs"

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def put(self, record: EditRecord) -> None:
        fields = {"id": record.id, "spec": json.dumps(record.spec),
                  "model": record.model, "model_hash": record.model_hash, "job_id": record.job_id,
                  "created": repr(record.created)}
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self._key(record.tenant, record.id), mapping=fields)
            pipe.zadd(self._index(record.tenant), {record.id: record.created})
            pipe.execute()

    def _request_key(self, tenant: str, request_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:editreq-id:{request_id}"

    def claim_request(self, tenant: str, request_id: str, edit_id: str) -> str:
        """Bind an idempotency key to ``edit_id`` unless it is already bound; return the bound edit id."""
        key = self._request_key(tenant, request_id)
        with outage_as_unavailable(self.redis):
            if self.redis.set(key, edit_id, nx=True, ex=REQUEST_ID_TTL_S):
                return edit_id
            bound = self.redis.get(key)
        return bound.decode() if bound is not None else self.claim_request(tenant, request_id, edit_id)

    def release_request(self, tenant: str, request_id: str) -> None:
        """Forget a key whose create failed, so a retry can succeed."""
        with outage_as_unavailable(self.redis):
            self.redis.delete(self._request_key(tenant, request_id))

    def get(self, edit_id: str, tenant: str) -> EditRecord:
        with outage_as_unavailable(self.redis):
            raw = self.redis.hgetall(self._key(tenant, edit_id))
        h = {k.decode(): v.decode() for k, v in raw.items()}
        if not h:
            raise NotFound("edit", f"edits/{edit_id}")
        return EditRecord(id=h["id"], tenant=tenant, spec=json.loads(h["spec"]), model=h["model"],
                          model_hash=h["model_hash"], job_id=h["job_id"], created=float(h["created"]))

    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[EditRecord], bool]:
        """A page of the tenant's edits, newest first, and whether more follow."""
        with outage_as_unavailable(self.redis):
            ids = self.redis.zrevrange(self._index(tenant), offset, offset + limit)
        records = []
        for raw_id in ids[:limit]:
            try:
                records.append(self.get(raw_id.decode(), tenant))
            except NotFound:
                continue
        return records, len(ids) > limit

    def delete(self, edit_id: str, tenant: str) -> EditRecord:
        record = self.get(edit_id, tenant)
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self._key(tenant, edit_id))
            pipe.zrem(self._index(tenant), edit_id)
            pipe.execute()
        return record


def now() -> float:
    return time.time()
