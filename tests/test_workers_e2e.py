"""Real worker processes on a real Redis: crashes, slow jobs, duplicate requests, a flush."""

from __future__ import annotations

import os
import signal

import pytest

from sith_workers.connection import connect
from sith_workers.queue import JobQueue
from workers_fixtures import read_lines, start_worker_process, stop_processes, wait_done, wait_for

pytestmark = pytest.mark.slow


def test_worker_killed_mid_job_the_job_completes_on_another(own_redis, prefix, tmp_path):
    queue = JobQueue(connect(own_redis.url), prefix)
    log = tmp_path / "log"
    workers = [start_worker_process(own_redis.url, prefix, lease_s=1.5) for _ in range(2)]
    try:
        record = queue.submit("test.steps", {"key": "k", "log": str(log), "steps": 40, "step_s": 0.05},
                              tenant="t")
        first = wait_for(lambda: [l for l in read_lines(log) if l.startswith("start")], 120, "the job to start")
        victim = int(first[0].split()[1])
        wait_for(lambda: (queue.get(record.id).message or "").startswith("step"), 30, "a step")
        os.kill(victim, signal.SIGKILL)
        done = wait_done(queue, record.id, 60)
    finally:
        stop_processes(workers)
    starts = [l for l in read_lines(log) if l.startswith("start")]
    assert done.state == "succeeded" and done.attempts == 2
    assert done.result["pid"] != victim and len(starts) == 2
    assert queue.depth() == 0


def test_slow_live_worker_is_not_robbed(own_redis, prefix, tmp_path):
    queue = JobQueue(connect(own_redis.url), prefix)
    log = tmp_path / "log"
    workers = [start_worker_process(own_redis.url, prefix, lease_s=1.5) for _ in range(2)]
    try:
        wait_for(lambda: len(queue.workers()) == 2, 120, "both workers")
        record = queue.submit("test.steps", {"key": "k", "log": str(log), "steps": 10, "step_s": 0.5}, tenant="t")
        done = wait_done(queue, record.id, 120)                   # 5 s of work, over 3x the lease
    finally:
        stop_processes(workers)
    assert done.state == "succeeded" and done.attempts == 1
    assert len([l for l in read_lines(log) if l.startswith("start")]) == 1


def test_identical_concurrent_jobs_compute_once(own_redis, prefix, tmp_path):
    queue = JobQueue(connect(own_redis.url), prefix)
    log = tmp_path / "log"
    workers = [start_worker_process(own_redis.url, prefix) for _ in range(2)]
    try:
        wait_for(lambda: len(queue.workers()) == 2, 120, "both workers")
        payload = {"key": "decomposition/m/L11", "log": str(log), "compute_s": 3.0}
        jobs = [queue.submit("test.count", payload, tenant="t") for _ in range(2)]
        done = [wait_done(queue, j.id, 60) for j in jobs]
    finally:
        stop_processes(workers)
    assert [d.state for d in done] == ["succeeded", "succeeded"]
    assert {d.result["pid"] for d in done} == {w.pid for w in workers}    # really ran side by side
    assert [d.result["value"] for d in done] == ["decomposition/m/L11" * 3] * 2
    assert len([l for l in read_lines(log) if l.startswith("compute")]) == 1


def test_redis_flushed_mid_run_job_recomputes_and_completes(own_redis, prefix, tmp_path):
    client = connect(own_redis.url)
    queue = JobQueue(client, prefix)
    log, go = tmp_path / "log", tmp_path / "go"
    workers = [start_worker_process(own_redis.url, prefix)]
    try:
        record = queue.submit("test.steps", {"key": "k", "log": str(log), "go": str(go)}, tenant="t")
        wait_for(lambda: (queue.get(record.id).message or "") == "waiting", 120, "the job to wait")
        client.flushdb()                                          # cache, record and stream are gone
        go.touch()
        done = wait_done(queue, record.id, 60)                    # the worker rewrites the whole record
        later = queue.submit("test.count", {"key": "k", "log": str(log)}, tenant="t")   # group recreated
        later_done = wait_done(queue, later.id, 60)
    finally:
        stop_processes(workers)
    assert done.state == "succeeded" and done.kind == "test.steps" and done.result["value"] == "kkk"
    assert later_done.state == "succeeded"
    assert len([l for l in read_lines(log) if l.startswith("compute")]) == 2     # recomputed once after the flush


def test_sith_worker_cli_pool_runs_jobs_and_stops_cleanly(own_redis, prefix, tmp_path):
    import subprocess
    import sys

    from workers_fixtures import REPO, TESTS_DIR

    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
    cli = subprocess.Popen([sys.executable, "-c", "from sith.cli import main; main()", "worker", "--redis", own_redis.url, "--prefix", prefix,
                            "--concurrency", "2", "--plugin", "workers_plugin"], env=env, cwd=str(REPO))
    queue = JobQueue(connect(own_redis.url), prefix)
    try:
        wait_for(lambda: len(queue.workers()) == 2, 120, "two pool processes")
        pids = {info["pid"] for info in queue.workers().values()}
        record = queue.submit("test.count", {"key": "x", "log": str(tmp_path / "log")}, tenant="t")
        assert wait_done(queue, record.id, 60).state == "succeeded"
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
    finally:
        stop_processes([cli])
    for pid in pids:                                              # the pool took its children along
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert queue.workers() == {}                                  # they retired on the way out
