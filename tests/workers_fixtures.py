"""Real Redis for the worker tests: the shared server's db 6 under a unique prefix, or an
embedded server a test owns (when it must flush or stop Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from sith_workers.connection import connect
from sith_workers.embedded import EmbeddedRedis
from sith_workers.queue import JobQueue, JobRecord

SHARED_URL = os.environ.get("SITH_TEST_REDIS_URL", "redis://127.0.0.1:6379/6")
TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def shared(prefix: str) -> Iterator[redis.Redis]:
    """A client of the shared Redis (db 6); the test's keys (its prefix) are deleted afterwards.
    Without a shared Redis the tests run against an embedded one."""
    embedded = None
    client = connect(SHARED_URL)
    try:
        client.ping()
    except redis.RedisError:
        embedded = EmbeddedRedis().start()
        client = connect(embedded.url)
    yield client
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    if embedded:
        embedded.stop()


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis server only this test uses (free to flush)."""
    with EmbeddedRedis() as server:
        yield server


def wait_for(predicate: Callable[[], object], timeout_s: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def wait_done(queue: JobQueue, job_id: str, timeout_s: float = 120.0) -> JobRecord:
    def done():
        record = queue.get(job_id)
        return record if record is not None and record.done else None
    return wait_for(done, timeout_s, f"job {job_id} to finish")  # type: ignore[return-value]


def start_worker_process(url: str, prefix: str, lease_s: float = 60.0) -> subprocess.Popen:
    """One real worker process (``run_worker`` directly, no pool: SIGKILL hits the worker itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from sith_workers.pool import run_worker; from sith_workers.worker import WorkerSettings; "
            f"run_worker(WorkerSettings(redis_url={url!r}, prefix={prefix!r}, lease_s={lease_s!r}, "
            "plugins=('workers_plugin',)))")
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(REPO))


def stop_processes(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
