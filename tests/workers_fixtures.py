"""Helpers of the worker tests (waiting, worker processes). The Redis fixtures (``prefix``,
``shared`` on db 6, ``own_redis``) live in conftest.py; they are re-exported here for modules that
still import them by name."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import own_redis, prefix, shared  # noqa: F401 - re-exported fixtures

from sith_workers.queue import JobQueue, JobRecord
from sith_workers.worker import Worker, WorkerSettings

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


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


@contextmanager
def running_worker(client, prefix: str, **settings) -> Iterator[Worker]:
    """A real Worker consuming ``prefix``'s queue in a thread until the block ends: on ``client``'s
    Redis, or (``client`` None) on the one ``redis_url`` in ``settings`` names."""
    settings.setdefault("redis_url", "unused")
    worker = Worker(WorkerSettings(prefix=prefix, **settings), client=client,
                    consumer=f"w{threading.get_ident()}-{time.monotonic_ns()}")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(30)


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
