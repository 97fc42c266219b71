"""JobQueue and the worker loop against the real Redis (in-process worker threads)."""

from __future__ import annotations

import threading
import time

import pytest

import workers_plugin  # noqa: F401  (registers test.* job kinds)
from sith.engine.errors import InvalidInput
from sith_workers.handlers import register
from sith_workers.queue import JobNotFound, JobQueue
from sith_workers.worker import Worker, WorkerSettings
from workers_fixtures import wait_done, wait_for


@register("test.invalid")
def _invalid(ctx, payload):
    raise InvalidInput("concepts[1]", "unknown concept 'dgo'", ["dog"])


@register("test.boom")
def _boom(ctx, payload):
    raise RuntimeError("engine exploded")


def _worker(client, prefix: str, **settings) -> Worker:
    return Worker(WorkerSettings(redis_url="unused", prefix=prefix, **settings), client=client,
                  consumer=f"w{threading.get_ident()}-{time.monotonic_ns()}")


def _run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def test_submit_get_events_and_dedupe(shared, prefix):
    queue = JobQueue(shared, prefix)
    record = queue.submit("explain", {"model": None, "k": 5}, tenant="acme", dedupe_key="explain:abc")
    got = queue.get(record.id)
    assert got is not None and got.state == "queued" and got.payload == {"model": None, "k": 5}
    assert got.tenant == "acme" and got.kind == "explain" and got.result is None
    assert queue.submit("explain", {}, tenant="acme", dedupe_key="explain:abc").id == record.id
    assert queue.submit("explain", {}, tenant="other", dedupe_key="explain:abc").id != record.id
    assert queue.depth() == 2
    assert [r.id for r in queue.list("acme")] == [record.id]
    first = next(queue.events(record.id, timeout_s=1))
    assert first.state == "queued" and not first.done
    assert queue.get("nope") is None


def test_cancel_queued_job_and_resubmit(shared, prefix):
    queue = JobQueue(shared, prefix)
    record = queue.submit("explain", {}, tenant="t", dedupe_key="k")
    cancelled = queue.cancel(record.id)
    assert cancelled.state == "cancelled" and cancelled.cancel_requested
    events = list(queue.events(record.id, timeout_s=2))
    assert events[-1].state == "cancelled"
    # a cancelled job no longer blocks its dedupe key; cancelling twice changes nothing
    assert queue.submit("explain", {}, tenant="t", dedupe_key="k").id != record.id
    assert queue.cancel(record.id).state == "cancelled"
    with pytest.raises(JobNotFound):
        queue.cancel("missing")


def test_worker_runs_job_to_success_and_acks(shared, prefix, tmp_path):
    queue = JobQueue(shared, prefix)
    worker = _worker(shared, prefix)
    thread = _run_in_thread(worker)
    try:
        record = queue.submit("test.steps", {"key": "k1", "log": str(tmp_path / "log"), "steps": 3}, tenant="t")
        states = [e.state for e in queue.events(record.id, timeout_s=30)]
        done = queue.get(record.id)
    finally:
        worker.stop()
        thread.join(10)
    assert done.state == "succeeded" and done.progress == 1.0 and done.attempts == 1
    assert done.result["value"] == "k1k1k1"
    assert states[0] == "queued" and "running" in states and states[-1] == "succeeded"
    assert queue.depth() == 0                                      # acked and deleted
    assert shared.ttl(queue.record_key(record.id)) > 0             # finished records expire


def test_failures_carry_field_and_reason(shared, prefix):
    queue = JobQueue(shared, prefix)
    worker = _worker(shared, prefix)
    thread = _run_in_thread(worker)
    try:
        invalid = queue.submit("test.invalid", {}, tenant="t")
        boom = queue.submit("test.boom", {}, tenant="t")
        unknown = queue.submit("no.such.kind", {}, tenant="t")
        invalid, boom, unknown = (wait_done(queue, j.id, 30) for j in (invalid, boom, unknown))
    finally:
        worker.stop()
        thread.join(10)
    assert invalid.state == "failed"
    assert invalid.error == {"code": "invalid_argument", "reason": "unknown concept 'dgo'",
                             "field": "concepts[1]", "suggestions": ["dog"]}
    assert boom.error["code"] == "internal" and "engine exploded" in boom.error["reason"]
    assert unknown.error["code"] == "unimplemented"
    assert queue.depth() == 0


def test_cancel_running_job_between_steps(shared, prefix, tmp_path):
    queue = JobQueue(shared, prefix)
    worker = _worker(shared, prefix)
    thread = _run_in_thread(worker)
    try:
        record = queue.submit("test.steps", {"key": "k", "log": str(tmp_path / "log"), "steps": 200,
                                             "step_s": 0.05}, tenant="t")
        wait_for(lambda: (queue.get(record.id).message or "").startswith("step"), 30, "job to run")
        queue.cancel(record.id)
        done = wait_done(queue, record.id, 30)
    finally:
        worker.stop()
        thread.join(10)
    assert done.state == "cancelled" and done.progress < 1.0 and done.result is None


def test_finished_job_is_never_overwritten(shared, prefix):
    queue = JobQueue(shared, prefix)
    record = queue.submit("x", {}, tenant="t")
    assert queue.finish(record, "succeeded", result={"a": 1})
    assert not queue.finish(record, "failed", error={"code": "internal", "reason": "late duplicate"})
    assert queue.get(record.id).state == "succeeded" and queue.get(record.id).result == {"a": 1}


class _Clock:
    """The queue's injected time source: leases expire without the test sleeping."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_lease_extension_and_reclaim(shared, prefix):
    clock = _Clock()
    queue = JobQueue(shared, prefix, clock=clock)
    queue.ensure_group()
    record = queue.submit("x", {}, tenant="t")
    [delivery] = queue.fetch("alive", block_ms=100)
    clock.now += 50
    assert queue.extend("alive", delivery)                       # resets the lease
    clock.now += 30
    assert queue.reclaim("thief", min_idle_ms=60_000) == []      # a live owner is not robbed
    clock.now += 31
    [stolen] = queue.reclaim("thief", min_idle_ms=60_000)        # an owner that went quiet is
    assert stolen.job_id == record.id
    assert not queue.extend("alive", delivery)                   # ... and the old owner learns it


def test_entries_without_a_lease_record_fall_back_to_redis_idle_time(shared, prefix):
    """Entries of an older release (or whose worker died between read and lease) are still reclaimed."""
    queue = JobQueue(shared, prefix)
    queue.ensure_group()
    record = queue.submit("x", {}, tenant="t")
    [delivery] = queue.fetch("dead", block_ms=100)
    shared.zrem(queue.leases_key, delivery.message_id)
    [stolen] = queue.reclaim("thief", min_idle_ms=0)
    assert stolen.job_id == record.id


def test_job_that_keeps_killing_workers_fails_after_max_attempts(shared, prefix):
    queue = JobQueue(shared, prefix)
    queue.ensure_group()
    record = queue.submit("x", {}, tenant="t")
    [delivery] = queue.fetch("c0", 100)
    assert queue.start(delivery.job_id, "c0", max_attempts=2).attempts == 1   # c0 "dies" here
    [delivery] = queue.reclaim("c1", 0)
    assert queue.start(delivery.job_id, "c1", max_attempts=2).attempts == 2   # c1 too
    [delivery] = queue.reclaim("c2", 0)
    assert queue.start(delivery.job_id, "c2", max_attempts=2) is None
    final = queue.get(record.id)
    assert final.state == "failed" and "2 attempts" in final.error["reason"]


def test_stopping_worker_requeues_its_running_job(shared, prefix, tmp_path):
    queue = JobQueue(shared, prefix)
    worker = _worker(shared, prefix)
    thread = _run_in_thread(worker)
    record = queue.submit("test.steps", {"key": "k", "log": str(tmp_path / "log"), "steps": 200,
                                         "step_s": 0.05}, tenant="t")
    wait_for(lambda: (queue.get(record.id).message or "").startswith("step"), 30, "job to run")
    worker.stop()
    thread.join(10)
    requeued = queue.get(record.id)
    assert requeued.state == "queued" and queue.depth() == 1
    other = _worker(shared, prefix)
    other.run(max_jobs=1)
    assert queue.get(record.id).state == "succeeded"


def test_prune_drops_only_idle_consumers_without_pending_entries(shared, prefix):
    queue = JobQueue(shared, prefix)
    queue.ensure_group()
    queue.submit("x", {}, tenant="t")
    assert len(queue.fetch("busy-dead", 100)) == 1            # holds an entry: must stay
    shared.xgroup_createconsumer(queue.stream, "sith-workers", "idle-dead")   # holds nothing
    queue.announce("idle-dead", {"device": "cpu"})
    time.sleep(0.3)
    assert queue.prune(max_idle_s=0.2) == ["idle-dead"]
    names = {c["name"] for c in shared.xinfo_consumers(queue.stream, "sith-workers")}
    assert names == {b"busy-dead"} and queue.workers() == {}


def test_progress_restores_a_lost_record_whole_and_sees_a_finished_one(shared, prefix):
    queue = JobQueue(shared, prefix)
    queue.ensure_group()
    record = queue.submit("x", {"a": 1}, tenant="t")
    [delivery] = queue.fetch("c", 100)
    running = queue.start(delivery.job_id, "c", max_attempts=3)
    shared.delete(queue.record_key(record.id))                     # as after a flush
    assert queue.progress(running, 0.5, "half") == "ok"
    restored = queue.get(record.id)
    assert (restored.state, restored.kind, restored.payload, restored.progress) == ("running", "x", {"a": 1}, 0.5)
    queue.cancel(record.id)
    assert queue.progress(running, 0.6, "more") == "cancel"
    duplicate = queue.get(record.id)
    queue.finish(duplicate, "succeeded", result={})
    assert queue.progress(running, 0.7, "late") == "finished"
    assert queue.get(record.id).state == "succeeded"


def test_worker_survives_a_redis_outage_and_stops_promptly(own_redis):
    from sith_workers.connection import connect

    client = connect(own_redis.url)
    worker = Worker(WorkerSettings(redis_url=own_redis.url, prefix="sith"), client=client, consumer="c")
    thread = _run_in_thread(worker)
    wait_for(lambda: JobQueue(client).workers(), 10, "the worker to announce itself")
    own_redis.stop()                                               # Redis goes away under the worker
    time.sleep(1.5)
    assert thread.is_alive()                                       # backing off, not crashed
    worker.stop()
    thread.join(5)
    assert not thread.is_alive()


@register("test.not_json")
def _not_json(ctx, payload):
    return {"value": object()}


def test_a_result_that_is_not_json_fails_the_job_not_the_worker(shared, prefix):
    queue = JobQueue(shared, prefix)
    worker = _worker(shared, prefix)
    thread = _run_in_thread(worker)
    try:
        bad = queue.submit("test.not_json", {}, tenant="t")
        good = queue.submit("test.invalid", {}, tenant="t")
        bad, good = wait_done(queue, bad.id, 30), wait_done(queue, good.id, 30)
    finally:
        worker.stop()
        thread.join(10)
    assert bad.state == "failed" and "not JSON" in bad.error["reason"]
    assert good.error["code"] == "invalid_argument"                # the worker kept going
