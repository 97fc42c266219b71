"""Build, start and stop the gRPC server: interceptors, servicers, health, reflection, metrics."""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_server import images
from sith_server.auth import AuthInterceptor, read_tokens
from sith_server.config import ServerConfig
from sith_server.deps import Deps
from sith_server.downloads import DownloadEndpoint, Signer
from sith_server.errors import ErrorInterceptor
from sith_server.health import SERVICES, HealthMonitor
from sith_server.interceptors import CallGuard, Gate
from sith_server.metrics import Metrics, MetricsInterceptor, redis_stats
from sith_server.runtime import ModelRuntime, configure_text_limits
from sith_server.servicers import adaptation
from sith_server.servicers.analysis import AnalysisServicer
from sith_server.servicers import edits as edits_servicer
from sith_server.servicers.edits import EditsServicer
from sith_server.servicers.embeddings import EmbeddingsServicer
from sith_server.servicers.models import ModelsServicer
from sith_server.servicers.operations import OperationsServicer
from sith_server.vocabulary import Vocabulary
from sith_server.vocabulary import from_setting as vocabulary_from_setting
from sith_workers.connection import connect_api
from sith_workers.edits import EditStore
from sith_workers.gc import Collector
from sith_workers.queue import JobQueue, QueueLimits

log = logging.getLogger(__name__)
# A request may carry a batch of encoded images (32 photos of ~1 MB each); replies stay under 4 MB
# except DownloadEdit chunks, which a client sizes with chunk_bytes (up to 16 MiB).
MAX_RECEIVE_BYTES = 32 * 2**20
MAX_SEND_BYTES = 17 * 2**20


class SithServer:
    """A built server; ``start()`` binds and serves, ``stop(grace)`` drains and shuts down."""

    def __init__(self, config: ServerConfig, deps: Deps, server: grpc.Server, health: HealthMonitor,
                 port: int) -> None:
        self.config = config
        self.deps = deps
        self.server = server
        self.health = health
        self.port = port
        self.metrics_port: int | None = None
        self.gc = Collector(deps.edits, config.data_dir, config.limits.edit_ttl_s, config.limits.gc_interval_s)
        self._stopped = threading.Event()

    def start(self) -> SithServer:
        self.server.start()
        self.health.start()
        self.gc.start()
        if self.config.metrics_port:
            self.metrics_port = self.deps.metrics.serve(self.config.metrics_port, self.config.metrics_bind)
        if self.deps.downloads is not None:
            self.deps.downloads.start()
        log.info("sith gRPC server on port %d%s", self.port,
                 f", metrics on :{self.metrics_port}" if self.metrics_port else "")
        return self

    def stop(self, grace: float | None = 10.0) -> None:
        """NOT_SERVING first, then let in-flight calls finish for ``grace`` seconds.

        Jobs are unaffected: they live in the Redis queue and workers finish or requeue them.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.deps.stopping.set()
        self.health.shutdown()
        self.gc.stop()
        self.server.stop(grace).wait()
        if self.deps.downloads is not None:
            self.deps.downloads.stop()
        self.deps.metrics.stop_serving()

    def wait(self) -> None:
        self.server.wait_for_termination()


def build(config: ServerConfig, *, redis_client: redis.Redis | None = None, runtime: ModelRuntime | None = None,
          vocabulary: Vocabulary | None = None, prefix: str = "sith", max_workers: int | None = None) -> SithServer:
    """Wire a server for ``config``; pass ``runtime``/``redis_client`` to share ones already built."""
    if redis_client is None:
        if config.redis_url is None:
            raise ValueError("build() needs config.redis_url or a redis_client (sith serve starts an embedded one)")
        redis_client = connect_api(config.redis_url)   # a hung Redis fails calls in < 1 s
    if max_workers is not None:          # tests size the pool directly; the gate keeps the reserve
        reserved = max(1, min(config.limits.reserved_threads, max_workers // 8))
        config = dataclasses.replace(config, limits=dataclasses.replace(
            config.limits, grpc_threads=max_workers, reserved_threads=reserved,
            max_streams=min(config.limits.max_streams, max_workers - reserved)))
    max_workers = config.limits.grpc_threads
    images.configure(config.limits)
    configure_text_limits(config.limits.text_max_chars, config.limits.tokenizer_cache_entries)
    metrics = Metrics()
    metrics.add_redis_collector(lambda: redis_stats(redis_client, prefix))
    if runtime is None:
        runtime = ModelRuntime(config.device, on_load=lambda kind, s: _count_load(metrics, kind, s))
        runtime.preload(config.models)
    queue = JobQueue(redis_client, prefix, limits=queue_limits(config))
    deps = Deps(config=config, redis=redis_client, runtime=runtime, queue=queue,
                edits=EditStore(redis_client, prefix),
                vocabulary=vocabulary or vocabulary_from_setting(config.vocabulary, _vocabulary_model(config)),
                metrics=metrics)
    tokens = None if config.auth_disabled else read_tokens(_required(config.auth_tokens_file))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sith-grpc"),
        # Gate first (keeps reserved threads free for probes), metrics only after auth, CallGuard innermost.
        interceptors=[Gate.from_limits(config.limits, metrics.reject), AuthInterceptor(tokens, metrics.reject),
                      MetricsInterceptor(metrics), ErrorInterceptor(), CallGuard(config.limits, metrics.reject)],
        options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                 ("grpc.max_send_message_length", MAX_SEND_BYTES)],
    )
    edits = EditsServicer(deps)
    pb_grpc.add_ModelsServicer_to_server(ModelsServicer(deps), server)
    pb_grpc.add_AnalysisServicer_to_server(AnalysisServicer(deps), server)
    edits_servicer.add_to_server(edits, server)   # DownloadEdit streams pre-encoded chunks
    pb_grpc.add_EmbeddingsServicer_to_server(EmbeddingsServicer(deps, edits), server)
    pb_grpc.add_OperationsServicer_to_server(OperationsServicer(deps, max_watchers=max_workers // 2), server)
    adaptation.add_to_server(server, deps)
    health = HealthMonitor(redis_client)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = _bind(server, config)
    if config.download_port is not None:   # bound last: nothing after it can fail and leak its socket
        deps.downloads = DownloadEndpoint(
            deps.edits, host=config.download_bind, port=config.download_port, signer=Signer(config.download_secret),
            max_streams=config.limits.max_streams, ttl_s=config.download_url_ttl_s,
            base_url=config.download_base_url,
            tls=(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None,
            on_served=deps.metrics.observe_download)
    return SithServer(config, deps, server, health, port)


def queue_limits(config: ServerConfig) -> QueueLimits:
    """The job quotas of ``config`` (workers read the same variables through QueueLimits.from_env)."""
    limits = config.limits
    return QueueLimits(max_queued_jobs=limits.max_queued_jobs_per_tenant,
                       max_running_jobs=limits.max_running_jobs_per_tenant, max_edits=limits.max_edits_per_tenant,
                       max_artifact_bytes=limits.max_artifact_bytes_per_tenant,
                       job_time_limit_s=limits.job_time_limit_s, job_time_limits_s=limits.job_time_limits_s)


def _required(path: Path | None) -> Path:
    if path is None:
        raise ValueError("auth is on but SITH_AUTH_TOKENS_FILE is unset")
    return path


def _count_load(metrics: Metrics, kind: str, seconds: float) -> None:
    metrics.model_loads.labels(kind).inc()
    metrics.model_load_seconds.labels(kind).observe(seconds)


def _bind(server: grpc.Server, config: ServerConfig) -> int:
    if config.tls_cert is not None and config.tls_key is not None:
        credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(config.grpc_address, credentials)
    else:
        port = server.add_insecure_port(config.grpc_address)
    if port == 0:
        raise OSError(f"cannot listen on {config.grpc_address}")
    return port


def _vocabulary_model(config: ServerConfig) -> str | None:
    """The served model whose words names are checked against ("auto": the one model-aware rule).

    The server holds one vocabulary; with several models, the first one decides (set SITH_VOCABULARY
    explicitly for a mixed deployment). None = the embedded testbed model.
    """
    return config.models[0] if config.models else None
