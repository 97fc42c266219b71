"""Garbage collection of edits and their artifacts: TTLs, orphans, and the per-tenant byte quota.

Edits carry no Redis TTL (``volatile-lru`` must never evict user data), so nothing removed them but
DeleteEdit; each READY edit also has a checkpoint on disk (tens of MB). :func:`collect` applies the
operator's retention (``SITH_EDIT_TTL_S``, from the edit's creation; 0 keeps edits forever) and removes
files no edit refers to (a crashed export's temporary file, an edit deleted while its worker was
exporting), once they are older than a grace period so a running export is never touched.
:class:`Collector` runs it every ``SITH_GC_INTERVAL_S`` seconds in a daemon thread (the server starts one).

It works through a small interface of the edit store (``sith_workers.edits.EditStore``):
``index_key(tenant)`` (sorted set id -> creation time), ``key(tenant, id)`` (the record) and
``delete(tenant, id)`` returning the removed record with its artifact ``path``; and the layout
``{data_dir}/edits/{tenant folder}/{id}.safetensors`` of ``sith_workers.handlers.artifact_path``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis

from sith_workers.connection import RedisUnavailable, outage_as_unavailable
from sith_workers.queue import QuotaExceeded

log = logging.getLogger(__name__)
ORPHAN_GRACE_S = 3600.0        # an unreferenced file younger than this may be an export in progress
ARTIFACT_SUFFIX = ".safetensors"


class EditIndex(Protocol):
    prefix: str
    redis: redis.Redis

    def index_key(self, tenant: str) -> str: ...

    def key(self, tenant: str, edit_id: str) -> str: ...

    def delete(self, tenant: str, edit_id: str): ...


@dataclass
class Report:
    edits_deleted: list[str] = field(default_factory=list)      # "tenant/id"
    files_deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def _tenants(store: EditIndex) -> list[str]:
    """Tenants with an edit index (``{prefix}:tenant:{t}:edits``)."""
    pattern = store.index_key("*")
    head, tail = pattern.split("*", 1)
    out = []
    with outage_as_unavailable(store.redis):
        for key in store.redis.scan_iter(match=pattern, count=1000):
            name = key.decode()
            if name.startswith(head) and name.endswith(tail):
                tenant = name[len(head):len(name) - len(tail)]
                if ":" not in tenant:
                    out.append(tenant)
    return out


def _unlink(path: Path, report: Report) -> None:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return
    report.files_deleted.append(str(path))
    report.bytes_freed += size


def expire_edits(store: EditIndex, edit_ttl_s: int, now: float | None = None, report: Report | None = None) -> Report:
    """Delete edits created more than ``edit_ttl_s`` ago (records, index entries, request ids, files)."""
    report = report or Report()
    if edit_ttl_s <= 0:
        return report
    cutoff = (time.time() if now is None else now) - edit_ttl_s
    for tenant in _tenants(store):
        with outage_as_unavailable(store.redis):
            expired = [i.decode() for i in store.redis.zrangebyscore(store.index_key(tenant), "-inf", cutoff)]
        for edit_id in expired:
            record = store.delete(tenant, edit_id)
            with outage_as_unavailable(store.redis):
                store.redis.zrem(store.index_key(tenant), edit_id)      # also an index entry without a record
            report.edits_deleted.append(f"{tenant}/{edit_id}")
            path = getattr(record, "path", "") if record is not None else ""
            if path:
                _unlink(Path(path), report)
    return report


def remove_orphans(store: EditIndex, data_dir: Path, now: float | None = None, grace_s: float = ORPHAN_GRACE_S,
                   report: Report | None = None) -> Report:
    """Delete artifact files (and export temporaries) that no edit record refers to."""
    report = report or Report()
    root = Path(data_dir) / "edits"
    if not root.is_dir():
        return report
    now = time.time() if now is None else now
    live: set[str] = set()
    pattern = store.key("*", "*")
    with outage_as_unavailable(store.redis):
        for key in store.redis.scan_iter(match=pattern, count=1000):
            live.add(key.decode().rsplit(":", 1)[-1])
    for path in root.glob(f"*/*{ARTIFACT_SUFFIX}"):
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        edit_id = path.name.lstrip(".").split(".", 1)[0]
        temporary = path.name.startswith(".")
        if age >= grace_s and (temporary or edit_id not in live):
            _unlink(path, report)
    return report


def collect(store: EditIndex, data_dir: Path, edit_ttl_s: int, now: float | None = None,
            grace_s: float = ORPHAN_GRACE_S) -> Report:
    """One GC pass: expired edits, then orphaned files. Safe to run from several processes at once."""
    report = expire_edits(store, edit_ttl_s, now)
    remove_orphans(store, data_dir, now, grace_s, report)
    if report.edits_deleted or report.files_deleted:
        log.info("gc: %d edits expired, %d files removed (%d bytes)", len(report.edits_deleted),
                 len(report.files_deleted), report.bytes_freed)
    return report


def artifact_bytes(folder: Path) -> int:
    """Bytes of a tenant's artifacts (its folder under ``{data_dir}/edits``)."""
    total = 0
    for path in Path(folder).glob(f"*{ARTIFACT_SUFFIX}"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def check_artifact_quota(folder: Path, tenant: str, limit: int, incoming: int = 0) -> None:
    """QuotaExceeded("artifact_bytes") if the tenant's artifacts plus ``incoming`` bytes exceed ``limit``."""
    if limit > 0 and artifact_bytes(folder) + incoming > limit:
        raise QuotaExceeded("artifact_bytes", limit, tenant)


class Collector:
    """Runs :func:`collect` every ``interval_s`` seconds in a daemon thread until :meth:`stop`."""

    def __init__(self, store: EditIndex, data_dir: Path, edit_ttl_s: int, interval_s: float) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.edit_ttl_s = edit_ttl_s
        self.interval_s = interval_s
        self.last: Report | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Collector:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="sith-gc", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.last = collect(self.store, self.data_dir, self.edit_ttl_s)
            except RedisUnavailable as exc:
                log.warning("gc skipped: %s", exc)
            except Exception:                      # noqa: BLE001 - GC must never take the server down
                log.exception("gc pass failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
