"""grpc.health.v1 per service, kept in step with Redis reachability and shutdown.

Models and Embeddings answer from this process and stay SERVING while Redis is down; Analysis,
Edits, Operations and the overall status ("") need Redis and turn NOT_SERVING until it is back.
During graceful shutdown every service is NOT_SERVING, so load balancers drain the server first.
"""

from __future__ import annotations

import logging
import threading

import redis
from grpc_health.v1 import health, health_pb2

from sith_api.v1 import adaptation_pb2, sith_pb2

log = logging.getLogger(__name__)
SERVICES = tuple(service.full_name for module in (sith_pb2, adaptation_pb2)
                 for service in module.DESCRIPTOR.services_by_name.values())
LOCAL_SERVICES = frozenset({"sith.v1.Models", "sith.v1.Embeddings"})
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    def __init__(self, redis_client: redis.Redis, interval_s: float = 2.0) -> None:
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self._redis = redis_client
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.redis_ok: bool | None = None
        self._set(redis_ok=self._ping())

    def _ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        except Exception as exc:  # noqa: BLE001 - a health probe must never crash the loop
            log.warning("health: unexpected Redis error: %s", exc)
            return False

    def _set(self, redis_ok: bool) -> None:
        if self._stop.is_set() or redis_ok == self.redis_ok:
            return
        if self.redis_ok is not None:
            log.warning("Redis is %s", "reachable again" if redis_ok else "unreachable: job services NOT_SERVING")
        self.redis_ok = redis_ok
        for name in SERVICES:
            self.servicer.set(name, SERVING if redis_ok or name in LOCAL_SERVICES else NOT_SERVING)
        self.servicer.set("", SERVING if redis_ok else NOT_SERVING)

    def check_now(self) -> bool:
        """Ping Redis once and update the statuses (tests, and the background loop)."""
        ok = self._ping()
        self._set(ok)
        return ok

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self._interval):
                self.check_now()

        self._thread = threading.Thread(target=loop, name="sith-health", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Every service NOT_SERVING from now on (graceful shutdown)."""
        self._stop.set()
        self.servicer.enter_graceful_shutdown()
        if self._thread is not None:
            self._thread.join(timeout=self._interval + 1)
