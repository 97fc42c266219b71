"""Issue 15, items 6 (TTL + GC of edits and artifacts, artifact quota) and 8 (cancelling a running
job in <= 2 s on the testbed), against the real Redis and a real worker."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sith_workers.edits import EditStore
from sith_workers.gc import Collector, artifact_bytes, check_artifact_quota, collect
from sith_workers.handlers import register
from sith_workers.queue import JobQueue, QuotaExceeded
from workers_fixtures import prefix, running_worker, shared, wait_done, wait_for  # noqa: F401

TESTBED = Path(__file__).resolve().parent.parent / "sith" / "testbed" / "checkpoints" / "testbed-main"


def _edit(store: EditStore, tenant: str, created: float, folder: Path | None = None) -> str:
    """A stored edit created at ``created`` (and its artifact file when ``folder`` is given)."""
    from sith_api.v1 import sith_pb2 as pb

    edit_id = store.new_id()
    store.create(tenant, edit_id, pb.EditSpec(), "hash")
    store.attach_job(tenant, edit_id, "job")
    store.redis.zadd(store.index_key(tenant), {edit_id: created})
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{edit_id}.safetensors"
        path.write_bytes(b"x" * 1000)
        store.redis.hset(store.key(tenant, edit_id), "path", str(path))
    return edit_id


def test_gc_expires_old_edits_with_their_files_and_keeps_young_ones(shared, prefix, tmp_path):
    store = EditStore(shared, prefix)
    now = time.time()
    old = _edit(store, "a", now - 100 * 86400, tmp_path / "edits" / "a")
    young = _edit(store, "a", now - 86400, tmp_path / "edits" / "a")
    other = _edit(store, "b", now - 100 * 86400)
    report = collect(store, tmp_path, edit_ttl_s=90 * 86400, now=now)
    assert sorted(report.edits_deleted) == sorted([f"a/{old}", f"b/{other}"])
    assert store.get("a", old) is None and store.get("b", other) is None and store.get("a", young) is not None
    assert not (tmp_path / "edits" / "a" / f"{old}.safetensors").exists()
    assert (tmp_path / "edits" / "a" / f"{young}.safetensors").exists() and report.bytes_freed == 1000
    assert collect(store, tmp_path, edit_ttl_s=0, now=now + 10**9).edits_deleted == []   # 0 = keep forever


def test_gc_removes_orphaned_artifacts_after_a_grace_period(shared, prefix, tmp_path):
    store = EditStore(shared, prefix)
    folder = tmp_path / "edits" / "a"
    live = _edit(store, "a", time.time(), folder)
    orphan = folder / f"{store.new_id()}.safetensors"             # its edit was deleted mid-export
    partial = folder / f".{store.new_id()}.tmp123.safetensors"    # a crashed export's temporary
    for path in (orphan, partial):
        path.write_bytes(b"y" * 10)
    assert collect(store, tmp_path, edit_ttl_s=0, grace_s=3600).files_deleted == []   # may still be exporting
    later = time.time() + 7200
    report = collect(store, tmp_path, edit_ttl_s=0, now=later, grace_s=3600)
    assert sorted(report.files_deleted) == sorted([str(orphan), str(partial)])
    assert (folder / f"{live}.safetensors").exists()


def test_gc_loop_runs_in_the_background(shared, prefix, tmp_path):
    store = EditStore(shared, prefix)
    old = _edit(store, "a", time.time() - 1000)
    collector = Collector(store, tmp_path, edit_ttl_s=100, interval_s=0.2).start()
    try:
        wait_for(lambda: store.get("a", old) is None, 10, "the GC loop to expire the edit")
    finally:
        collector.stop()
    assert collector.last is not None and f"a/{old}" in collector.last.edits_deleted


def test_artifact_bytes_quota(tmp_path):
    folder = tmp_path / "edits" / "t"
    folder.mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"z" * 600)
    assert artifact_bytes(folder) == 600
    check_artifact_quota(folder, "t", limit=1000, incoming=400)
    with pytest.raises(QuotaExceeded) as err:
        check_artifact_quota(folder, "t", limit=1000, incoming=401)
    assert (err.value.resource, err.value.limit) == ("artifact_bytes", 1000)


@register("test.analyze")
def _analyze(ctx, payload):
    """A cold analyzer (encode the whole default dictionary), then explain every layer."""
    analyzer = ctx.analyzer({"model": payload["model"]})
    for layer in range(analyzer.loaded.info.layers):
        ctx.step(layer / analyzer.loaded.info.layers, f"layer {layer}")
        analyzer.explain(layers=[layer])
    return {}


@pytest.mark.skipif(not (TESTBED / "open_clip_model.safetensors").is_file(), reason="testbed not installed")
def test_cancelling_a_running_testbed_job_takes_under_two_seconds(shared, prefix):
    with running_worker(shared, prefix, block_ms=100):
        queue = JobQueue(shared, prefix)
        record = queue.submit("test.analyze", {"model": str(TESTBED)}, tenant="t")
        # Cancel while the dictionary (20k concepts, several seconds on this CPU) is being encoded:
        # before the hook this step had no cancellation point at all.
        wait_for(lambda: "Encoding concepts" in (queue.get(record.id).message or ""), 120, "dictionary encoding")
        started = time.monotonic()
        queue.cancel(record.id)
        final = wait_done(queue, record.id, 30)
        elapsed = time.monotonic() - started
    assert final.state == "cancelled"
    assert elapsed <= 2.0, f"cancellation took {elapsed:.2f}s"
    print(f"cancel latency {elapsed:.2f}s", os.environ.get("OMP_NUM_THREADS"))


@register("test.over_quota")
def _over_quota(ctx, payload):
    check_artifact_quota(Path(payload["folder"]), ctx.job.tenant, limit=1000, incoming=500)
    return {}


def test_a_job_over_a_quota_fails_with_resource_exhausted_not_internal(shared, prefix, tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"z" * 600)
    with running_worker(shared, prefix, block_ms=100):
        queue = JobQueue(shared, prefix)
        final = wait_done(queue, queue.submit("test.over_quota", {"folder": str(tmp_path)}, tenant="t").id, 30)
    assert final.state == "failed" and final.error["code"] == "resource_exhausted"
    assert final.error["field"] == "artifact_bytes" and final.error["limit"] == 1000
