"""Issue 15, item 6 and "Also": per-tenant quotas, fair scheduling, job time limits, transient-error
retries with backoff and the dead-letter stream, against the real Redis (clock-driven leases:
tests/test_workers_queue.py)."""

from __future__ import annotations


import pytest

import workers_plugin  # noqa: F401  (registers test.* job kinds)
from sith_workers.handlers import register
from sith_workers.queue import JobQueue, JobTimedOut, QueueLimits, QuotaExceeded, is_transient
from workers_fixtures import prefix, running_worker, shared, wait_done  # noqa: F401


class FakeClock:
    """The queue's time source in tests: leases, deadlines and backoff advance without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


def _queue(shared, prefix, clock=None, **limits) -> JobQueue:
    queue = JobQueue(shared, prefix, limits=QueueLimits(**limits), clock=clock)
    queue.ensure_group()
    return queue


def test_queued_jobs_quota_is_per_tenant_and_freed_by_cancel(shared, prefix):
    queue = _queue(shared, prefix, max_queued_jobs=3)
    jobs = [queue.submit("x", {}, tenant="greedy") for _ in range(3)]
    with pytest.raises(QuotaExceeded) as err:
        queue.submit("x", {}, tenant="greedy")
    assert (err.value.resource, err.value.limit, err.value.tenant) == ("queued_jobs", 3, "greedy")
    assert queue.submit("x", {}, tenant="polite").state == "queued"        # other tenants unaffected
    queue.cancel(jobs[0].id)
    assert queue.submit("x", {}, tenant="greedy").state == "queued"        # the cancelled one freed its place
    assert queue.tenant_usage("greedy") == {"queued_jobs": 3, "running_jobs": 0}


def test_stored_edits_quota_counts_the_tenants_edit_index(shared, prefix):
    queue = _queue(shared, prefix, max_edits=2)
    shared.zadd(queue.edits_index_key("t"), {"e1": 1, "e2": 2})
    with pytest.raises(QuotaExceeded) as err:
        queue.submit("edit", {"spec": {}}, tenant="t")
    assert err.value.resource == "stored_edits"
    assert queue.submit("edit", {"spec": {}, "dry_run": True}, tenant="t").state == "queued"   # previews store nothing


def test_fair_scheduling_serves_a_small_tenant_before_a_flooding_one(shared, prefix):
    queue = _queue(shared, prefix, max_queued_jobs=50, max_running_jobs=2)
    flood = [queue.submit("x", {}, tenant="flood") for _ in range(40)]
    small = queue.submit("x", {}, tenant="small")
    order = []
    for _ in range(3):
        [delivery] = queue.fetch("w", block_ms=100)
        order.append(delivery.job_id)
        queue.start(delivery.job_id, "w", max_attempts=3)
        queue.finish(queue.get(delivery.job_id), "succeeded", result={})
        queue.ack(delivery)
    # FIFO would run all 40 flood jobs first; fair scheduling runs the small tenant's job second.
    assert order[0] == flood[0].id and order[1] == small.id and order[2] == flood[1].id


def test_running_quota_defers_a_tenant_and_lets_others_run(shared, prefix):
    clock = FakeClock()
    queue = _queue(shared, prefix, clock=clock, max_running_jobs=1)
    a1, a2 = queue.submit("x", {}, tenant="a"), queue.submit("x", {}, tenant="a")
    [d1] = queue.fetch("w1", 100)
    assert d1.job_id == a1.id
    assert queue.fetch("w2", 100) == [] and clock.slept > 0          # a2 waits: a already runs one
    b = queue.submit("x", {}, tenant="b")
    got = []
    for _ in range(4):                                               # the deferred ticket + b's ticket
        got += queue.fetch("w2", 100)
    assert [d.job_id for d in got] == [b.id]
    assert queue.tenant_usage("a") == {"queued_jobs": 1, "running_jobs": 1}
    queue.ack(d1)                                                    # a's first job ends
    [d2] = queue.fetch("w2", 100) or queue.fetch("w2", 100)
    assert d2.job_id == a2.id


def test_a_job_past_its_time_limit_is_stopped_at_its_next_step(shared, prefix):
    clock = FakeClock()
    queue = _queue(shared, prefix, clock=clock, job_time_limits_s=(("x", 100),))
    queue.submit("x", {}, tenant="t")
    [delivery] = queue.fetch("w", 100)
    running = queue.start(delivery.job_id, "w", max_attempts=3)
    assert running.deadline == clock.now + 100
    clock.now += 50
    assert queue.progress(running, 0.5, "half") == "ok"
    clock.now += 51
    with pytest.raises(JobTimedOut) as err:
        queue.progress(running, 0.6, "late")
    assert err.value.limit_s == 100 and "100s" in str(err.value)
    assert JobQueue.will_retry(running, "failed", {"code": "deadline_exceeded", "reason": str(err.value)}) is False


def test_a_real_worker_fails_a_job_over_its_time_limit(shared, prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("SITH_JOB_TIME_LIMITS", "test.steps=1")
    with running_worker(shared, prefix, block_ms=100):
        queue = JobQueue(shared, prefix)
        record = queue.submit("test.steps", {"key": "k", "log": str(tmp_path / "log"), "steps": 100,
                                             "step_s": 0.1}, tenant="t")
        final = wait_done(queue, record.id, 30)
    assert final.state == "failed" and final.error["code"] == "deadline_exceeded", final.error
    assert final.attempts == 1 and final.progress < 0.5                   # stopped, not retried
    assert queue.tenant_usage("t") == {"queued_jobs": 0, "running_jobs": 0}
    assert shared.xpending(queue.stream, "sith-workers")["pending"] == 0


def test_transient_errors_retry_with_backoff_then_dead_letter(shared, prefix):
    clock = FakeClock()
    queue = _queue(shared, prefix, clock=clock)
    record = queue.submit("x", {}, tenant="t")
    oom = {"code": "internal", "reason": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"}
    assert is_transient(oom) and not is_transient({"code": "internal", "reason": "ValueError: bad"})
    delays = []
    for attempt in (1, 2):
        [delivery] = queue.fetch("w", 100)
        running = queue.start(delivery.job_id, "w", max_attempts=3)
        assert running.attempts == attempt
        assert queue.finish(running, "failed", error=oom)            # not terminal: retried later
        queue.ack(delivery)
        again = queue.get(record.id)
        assert again.state == "queued" and again.message.startswith("retrying in")
        delays.append(float(again.message.split()[2].rstrip("s")))
        assert queue.fetch("w", 100) == []                           # not due yet: the ticket is deferred
        clock.now += delays[-1]
    assert delays == [2.0, 4.0]                                      # exponential backoff
    [delivery] = queue.fetch("w", 100)
    running = queue.start(delivery.job_id, "w", max_attempts=3)
    assert queue.finish(running, "failed", error=oom)
    final = queue.get(record.id)
    assert final.state == "failed" and "gave up after 3 attempts" in final.error["reason"]
    [dead] = queue.dead_letters()
    assert (dead["job"], dead["tenant"], dead["kind"], dead["attempts"]) == (record.id, "t", "x", "3")
    assert queue.dead_letters(tenant="other") == [] and queue.dead_letter_count() == 1


def test_a_job_that_keeps_killing_workers_is_dead_lettered(shared, prefix):
    queue = _queue(shared, prefix)
    record = queue.submit("x", {}, tenant="t")
    [delivery] = queue.fetch("c0", 100)
    queue.start(delivery.job_id, "c0", max_attempts=1)                # c0 dies
    [delivery] = queue.reclaim("c1", 0)
    assert queue.start(delivery.job_id, "c1", max_attempts=1) is None
    assert queue.get(record.id).state == "failed"
    assert [d["job"] for d in queue.dead_letters("t")] == [record.id]


_calls: dict[str, int] = {}


@register("test.flaky_oom")
def _flaky_oom(ctx, payload):
    """Fails like a GPU out of memory on its first run, succeeds on the second."""
    _calls[payload["key"]] = _calls.get(payload["key"], 0) + 1
    if _calls[payload["key"]] == 1:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (OutOfMemoryError)")
    return {"runs": _calls[payload["key"]]}


def test_a_real_worker_retries_a_transient_failure_and_succeeds(shared, prefix, monkeypatch):
    monkeypatch.setattr("sith_workers.queue.RETRY_BASE_S", 0.2)
    with running_worker(shared, prefix, block_ms=100):
        queue = JobQueue(shared, prefix)
        record = queue.submit("test.flaky_oom", {"key": prefix}, tenant="t")
        final = wait_done(queue, record.id, 30)
    assert final.state == "succeeded" and final.result == {"runs": 2} and final.attempts == 2


def test_a_real_worker_runs_a_small_tenants_job_before_a_floods_backlog(shared, prefix, tmp_path):
    """The issue's scene: one tenant queues many slow jobs, another then asks for one quick job."""
    queue = JobQueue(shared, prefix, limits=QueueLimits(max_queued_jobs=50))
    log = str(tmp_path / "log")
    flood = [queue.submit("test.steps", {"key": f"f{i}", "log": log, "steps": 3, "step_s": 0.1}, tenant="flood")
             for i in range(12)]
    quick = queue.submit("test.steps", {"key": "q", "log": log}, tenant="quick")
    with running_worker(shared, prefix, block_ms=100):
        done = wait_done(queue, quick.id, 60)
        finished_flood = sum(1 for r in (queue.get(j.id) for j in flood) if r.done)
    assert done.state == "succeeded"
    assert finished_flood <= 2, f"the quick job waited for {finished_flood} of the flood's 12 jobs"
