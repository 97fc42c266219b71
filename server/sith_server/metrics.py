"""Prometheus metrics for the server (``sith_`` prefix, base units, low-cardinality labels).

Request counts/latency come from an interceptor; model loads from the runtime; queue depth,
workers busy/idle and cache hits/misses are read from Redis at scrape time (workers are separate
processes, so their state lives in Redis, not in this process's registry).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sith_server.handlers import wrap

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """One registry per server, so tests can run several servers in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sith_grpc_requests", "gRPC calls by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("sith_grpc_request_duration_seconds", "gRPC call latency by method",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.job_duration = Histogram("sith_job_duration_seconds",
                                      "job time from submission to its final state, by kind",
                                      ["kind", "state"], buckets=JOB_BUCKETS, registry=self.registry)
        self.model_loads = Counter("sith_model_loads", "models loaded into the server, by kind",
                                   ["kind"], registry=self.registry)
        self.model_load_seconds = Histogram("sith_model_load_duration_seconds", "model load time by kind",
                                            ["kind"], buckets=JOB_BUCKETS, registry=self.registry)
        self.rejections = Counter("sith_grpc_rejected", "calls turned away before reaching a servicer, by reason "
                                  "(unauthenticated, busy, streams, streams_per_tenant)", ["reason"],
                                  registry=self.registry)
        self.http_downloads = Counter("sith_http_downloads", "signed-URL HTTP download responses by status",
                                      ["status"], registry=self.registry)
        self.http_download_bytes = Counter("sith_http_download_bytes", "bytes sent by the HTTP download endpoint",
                                           registry=self.registry)
        self._observed_jobs: set[str] = set()
        self._http = None

    def observe_download(self, status: int | None, nbytes: int) -> None:
        """Count an answer of the signed-URL download endpoint as it starts (``status``, the server's own
        code) and the bytes of a body once sent (``status`` None)."""
        if status is not None:
            self.http_downloads.labels(str(status)).inc()
        if nbytes > 0:
            self.http_download_bytes.inc(nbytes)

    def observe_job(self, job_id: str, kind: str, state: str, seconds: float) -> None:
        """Record a finished job once (the server sees jobs finish through Get/Watch)."""
        if job_id in self._observed_jobs:
            return
        if len(self._observed_jobs) > 100_000:
            self._observed_jobs.clear()
        self._observed_jobs.add(job_id)
        self.job_duration.labels(kind, state).observe(max(seconds, 0.0))

    def add_redis_collector(self, stats: Callable[[], dict]) -> None:
        """Export queue/worker/cache state from ``stats()`` (read from Redis at scrape time)."""
        self.registry.register(_RedisCollector(stats))

    def reject(self, reason: str) -> None:
        """Count a rejected call (reasons are a fixed set chosen by the server, never by the caller)."""
        self.rejections.labels(reason).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP endpoint on ``host`` (the gRPC host by default: never wider than the
        API); return the bound port (0 = pick one)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_serving(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


LIVE_CONSUMER_S = 60.0      # workers announce themselves every few seconds


def redis_stats(client, prefix: str = "sith") -> dict:
    """Queue depth (queued/running), workers (busy/idle) and cluster-wide cache hits/misses.

    Running = entries delivered but not acked (the group's pending list). Live workers come from
    their heartbeat announcements (``JobQueue.workers``), not from the group's consumers: a consumer
    only appears after its first delivery, so an idle new worker would be invisible there. A live
    worker is busy while its consumer holds a pending entry.
    """
    import redis

    from sith_workers.queue import GROUP, JobQueue

    stream = f"{prefix}:jobs"
    pipe = client.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.hgetall(f"{prefix}:cache-stats")
    pipe.xlen(f"{prefix}:dead")
    depth, cache, dead = pipe.execute()
    try:
        consumers = client.xinfo_consumers(stream, GROUP)
    except redis.ResponseError:       # no stream or group yet: nobody ever consumed
        consumers = []
    pending = {_text(c["name"]): int(c.get("pending", 0)) for c in consumers}
    live = JobQueue(client, prefix).workers(max_age_s=LIVE_CONSUMER_S)
    running = sum(pending.values())
    busy = sum(1 for name in live if pending.get(name, 0) > 0)
    return {"queued": max(int(depth) - running, 0), "running": running, "workers_busy": busy,
            "workers_idle": len(live) - busy, "cache_hit": int(cache.get(b"hits", 0)),
            "cache_miss": int(cache.get(b"misses", 0)), "dead_letters": int(dead)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _RedisCollector:
    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def collect(self):
        try:
            stats = self._stats()
        except Exception as exc:  # Redis down: export nothing rather than failing the scrape
            log.warning("metrics: cannot read queue stats: %s", exc)
            return
        depth = GaugeMetricFamily("sith_queue_depth", "jobs waiting or in flight", labels=["state"])
        for state in ("queued", "running"):
            if state in stats:
                depth.add_metric([state], stats[state])
        yield depth
        workers = GaugeMetricFamily("sith_workers", "worker processes by state", labels=["state"])
        for state in ("busy", "idle"):
            if f"workers_{state}" in stats:
                workers.add_metric([state], stats[f"workers_{state}"])
        yield workers
        cache = CounterMetricFamily("sith_cache_requests", "artifact cache lookups", labels=["result"])
        for result in ("hit", "miss"):
            if f"cache_{result}" in stats:
                cache.add_metric([result], stats[f"cache_{result}"])
        yield cache
        if "dead_letters" in stats:
            dead = GaugeMetricFamily("sith_dead_letters", "jobs in the dead-letter stream (exhausted their attempts)")
            dead.add_metric([], stats["dead_letters"])
            yield dead


UNKNOWN_METHOD = "unknown"


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts calls by method and final code and times them (streams: until the stream ends).

    Place it after auth: only authenticated calls reach it (auth counts its rejections without a
    method label). A method no servicer implements is counted as ``method="unknown"``, so callers
    cannot create series by inventing method names.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def _record(self, method: str, context: grpc.ServicerContext, start: float, failed: bool,
                cancelled: bool = False) -> None:
        code = context.code()
        if code is None:
            code = (grpc.StatusCode.CANCELLED if cancelled else
                    grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
        self._m.requests.labels(method, code.name).inc()
        self._m.latency.labels(method).observe(time.perf_counter() - start)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:
            return self._unknown()

        def around(call, request, context):
            start, failed = time.perf_counter(), True
            try:
                response = call(request, context)
                failed = False
                return response
            finally:
                self._record(method, context, start, failed)

        def around_stream(call, request, context):
            start, failed, cancelled = time.perf_counter(), True, False
            try:
                yield from call(request, context)
                failed = False
            except GeneratorExit:  # the client went away mid-stream
                cancelled = True
                raise
            finally:
                self._record(method, context, start, failed, cancelled)

        return wrap(handler, around, around_stream)

    def _unknown(self) -> grpc.RpcMethodHandler:
        """UNIMPLEMENTED, counted once under one label when it runs (i.e. after auth admitted it)."""
        def unimplemented(_request, context):
            self._m.requests.labels(UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")

        return grpc.unary_unary_rpc_method_handler(unimplemented)
