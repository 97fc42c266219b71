"""A pool of worker processes, ``concurrency`` per device, restarted if they die.

Processes (not threads): each owns its device, its CUDA context and its model LRU, and a crash or
OOM kill takes down one worker, whose job is then reclaimed by another. ``spawn`` start method:
forking a process that already imported torch (or holds a CUDA context) is unsafe.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess

from sith_workers.worker import Worker, WorkerSettings

log = logging.getLogger("sith.worker")


def run_worker(settings: WorkerSettings) -> None:
    """Process entry point: stop gracefully on SIGTERM/SIGINT (the running job is requeued)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(message)s")
    from sith.engine.threads import configure_threads  # spawned children skip the CLI's thread rule

    configure_threads(processes=settings.pool_size)
    for module in settings.plugins:
        importlib.import_module(module)
    worker = Worker(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    log.info("worker %s on %s ready", worker.consumer, settings.device)
    worker.run()


class WorkerPool:
    def __init__(self, settings: WorkerSettings, devices: list[str], concurrency: int = 1,
                 restart_delay_s: float = 1.0) -> None:
        size = len(devices) * concurrency
        self.slots = [replace(settings, device=d, pool_size=size) for d in devices for _ in range(concurrency)]
        self.restart_delay_s = restart_delay_s
        self.processes: list[BaseProcess | None] = [None] * len(self.slots)
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()          # no restart may slip in while stopping

    def start(self) -> WorkerPool:
        for i in range(len(self.slots)):
            self._spawn(i)
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="sith-worker-pool")
        self._monitor.start()
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM every worker, wait up to ``grace_s``, then SIGKILL the rest (their jobs are
        reclaimed later by other workers)."""
        with self._lock:
            self._stopping.set()
            alive = [p for p in self.processes if p is not None and p.is_alive()]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + grace_s
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        if self._monitor is not None:
            self._monitor.join()

    def request_stop(self) -> None:
        """Signal-handler safe: make ``wait()`` return (then call ``stop()``)."""
        self._stopping.set()

    def wait(self) -> None:
        """Block until ``stop()`` is called (from a signal handler or another thread)."""
        self._stopping.wait()

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p is not None and p.pid is not None]

    def _spawn(self, i: int) -> None:
        process = self._ctx.Process(target=run_worker, args=(self.slots[i],), daemon=False,
                                    name=f"sith-worker-{i}-{self.slots[i].device}")
        process.start()
        self.processes[i] = process

    def _watch(self) -> None:
        while not self._stopping.wait(self.restart_delay_s):
            with self._lock:
                for i, p in enumerate(self.processes):
                    if p is not None and not p.is_alive() and not self._stopping.is_set():
                        log.warning("worker %s exited with %s; restarting", p.name, p.exitcode)
                        self._spawn(i)
