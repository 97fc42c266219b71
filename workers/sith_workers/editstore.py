"""Persistent edit records per tenant: multipliers + manifest, never expiring.

Edits are the product's durable output (an edit is re-applicable and revertible from its
multipliers alone), so they carry no TTL; with ``maxmemory-policy volatile-lru`` Redis only evicts
keys that have one (cache entries, finished job records), never these.

Layout: ``{prefix}:tenant:{t}:edit:{id}`` hash (``multipliers`` safetensors bytes, ``manifest`` and
``plan`` JSON, ``created``) and ``{prefix}:tenant:{t}:edits`` sorted set by creation time. Writes are
idempotent: storing the same id again rewrites identical content and keeps the first ``created``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from sith_workers.connection import outage_as_unavailable


@dataclass
class EditRecord:
    id: str
    tenant: str
    multipliers: bytes          # sith.edits.Multipliers.to_bytes()
    manifest: dict[str, Any]
    plan: dict[str, Any]
    created: float


class EditStore:
    def __init__(self, redis_client: redis.Redis, prefix: str = "sith") -> None:
        self.redis = redis_client
        self.prefix = prefix

    def key(self, tenant: str, edit_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:edit:{edit_id}"

    def index_key(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:edits"

    def put(self, tenant: str, edit_id: str, multipliers: bytes, manifest: dict[str, Any],
            plan: dict[str, Any]) -> EditRecord:
        now = time.time()
        key = self.key(tenant, edit_id)
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(key, "created", repr(now))
            pipe.hset(key, mapping={"multipliers": multipliers, "manifest": json.dumps(manifest),
                                    "plan": json.dumps(plan)})
            pipe.persist(key)
            pipe.zadd(self.index_key(tenant), {edit_id: now}, nx=True)
            pipe.hget(key, "created")
            *_, created = pipe.execute()
        return EditRecord(edit_id, tenant, multipliers, manifest, plan, float(created))

    def get(self, tenant: str, edit_id: str) -> EditRecord | None:
        with outage_as_unavailable(self.redis):
            raw = self.redis.hgetall(self.key(tenant, edit_id))
        if not raw:
            return None
        return EditRecord(edit_id, tenant, raw[b"multipliers"], json.loads(raw[b"manifest"]),
                          json.loads(raw[b"plan"]), float(raw[b"created"]))

    def list(self, tenant: str, limit: int = 100) -> list[str]:
        """Edit ids of a tenant, newest first."""
        with outage_as_unavailable(self.redis):
            return [i.decode() for i in self.redis.zrevrange(self.index_key(tenant), 0, limit - 1)]

    def delete(self, tenant: str, edit_id: str) -> bool:
        with outage_as_unavailable(self.redis):
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.key(tenant, edit_id))
            pipe.zrem(self.index_key(tenant), edit_id)
            deleted, _ = pipe.execute()
        return bool(deleted)
