"""`sith serve`: the gRPC server, its workers and (with no configuration) an embedded Redis.

With nothing configured it is a complete local service: an embedded Redis it starts and stops
itself, one worker process, the embedded testbed model preloaded, auth disabled and the port bound
to localhost only (an open port without auth is never the default on a network interface).
Anything set in the ``SITH_*`` environment (docs/architecture.md) turns that default off piece by
piece; auth stays on whenever an external Redis or a tokens file is configured.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace

import click

LOCAL_ADDRESS = "127.0.0.1:50051"
SERVICE_HINT = ("the SITH service is not installed (the `sith` library ships without grpc and redis); "
                "install it with: pip install -e ./proto -e ./server   (packages sith-api, sith-service)")


def require_service(command: str) -> None:
    """A clear error, not a traceback, when `sith serve` / `sith worker` runs without the service."""
    import importlib.util

    missing = [name for name in ("sith_server", "sith_workers", "sith_api", "grpc", "redis")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise click.ClickException(f"`sith {command}`: {SERVICE_HINT} (missing: {', '.join(missing)})")


def _environment(address: str | None, workers: int | None, models: tuple[str, ...],
                 metrics_port: int | None) -> tuple[dict[str, str], bool]:
    """The SITH_* environment with CLI overrides applied, and whether this is the embedded default."""
    env = dict(os.environ)
    for name, value in (("SITH_GRPC_ADDRESS", address), ("SITH_WORKERS", workers),
                        ("SITH_METRICS_PORT", metrics_port), ("SITH_MODELS", ",".join(models) or None)):
        if value is not None:
            env[name] = str(value)
    embedded = not env.get("SITH_REDIS_URL") and not env.get("SITH_AUTH_TOKENS_FILE")
    if embedded:
        env.setdefault("SITH_AUTH_DISABLED", "1")
        if not env.get("SITH_GRPC_ADDRESS"):
            env["SITH_GRPC_ADDRESS"] = LOCAL_ADDRESS
    return env, embedded


@click.command("serve")
@click.option("--address", default=None, help="gRPC listen address (env SITH_GRPC_ADDRESS).")
@click.option("--workers", type=click.IntRange(0, 64), default=None,
              help="Worker processes to start; 0 = run `sith worker` separately (env SITH_WORKERS).")
@click.option("--model", "models", multiple=True,
              help="Model to preload (repeatable; env SITH_MODELS); default: the embedded testbed model.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Prometheus /metrics port, 0 = off (env SITH_METRICS_PORT).")
@click.option("--grace", type=click.FloatRange(0), default=10.0, show_default=True,
              help="Seconds in-flight calls get to finish on SIGTERM/Ctrl-C.")
@click.option("--prefix", default="sith", show_default=True, help="Redis key prefix (one per deployment).")
def serve(address: str | None, workers: int | None, models: tuple[str, ...], metrics_port: int | None,
          grace: float, prefix: str) -> None:
    """Run the SITH gRPC service until SIGTERM/Ctrl-C."""
    require_service("serve")
    from sith_server.app import build
    from sith_server.config import ServerConfig
    from sith_workers.embedded import EmbeddedRedis
    from sith_workers.pool import WorkerPool
    from sith_workers.worker import WorkerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(message)s")
    env, embedded = _environment(address, workers, models, metrics_port)
    config = ServerConfig.from_env(env)
    config.check()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    redis_server = pool = server = None
    try:
        redis_url = config.redis_url
        if redis_url is None:
            redis_server = EmbeddedRedis(data_dir=config.data_dir / "redis").start()
            redis_url = redis_server.url
            click.echo(f"sith serve: embedded Redis at {redis_url}", err=True)
        if embedded:
            click.echo("sith serve: embedded default, auth disabled (set SITH_AUTH_TOKENS_FILE to enable)", err=True)
        config = replace(config, redis_url=redis_url)
        if config.workers:
            settings = WorkerSettings(redis_url=redis_url, prefix=prefix, cache_ttl_s=config.cache_ttl_s,
                                      data_dir=config.data_dir)
            pool = WorkerPool(settings, [config.device], concurrency=config.workers).start()
        else:
            click.echo("sith serve: no workers started; jobs wait for `sith worker` processes", err=True)
        server = build(config, prefix=prefix)
        server.deps.vocabulary.warm()
        server.start()
        click.echo(f"sith serve: listening on {config.grpc_address} (port {server.port}); "
                   f"{config.workers} worker(s); Ctrl-C to stop", err=True)
        stop.wait()
        click.echo("sith serve: shutting down", err=True)
    finally:
        if server is not None:
            server.stop(grace)
        if pool is not None:
            pool.stop()
        if redis_server is not None:
            redis_server.stop()


def register(group: click.Group) -> None:
    group.add_command(serve)
