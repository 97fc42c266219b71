"""`sith worker`: run job workers against a Redis (this machine's devices, any number of machines)."""

from __future__ import annotations

import logging
import os
import signal

import click

from sith.engine.errors import InvalidInput


def _devices(spec: str) -> list[str]:
    """"cpu", "cuda:0", "cuda:0,cuda:1", or "auto" (every visible GPU, else the CPU)."""
    if spec == "auto":
        import torch

        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for device in devices:
        if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise InvalidInput("--device", f"expected cpu, cuda:N, a comma list, or auto; got {device!r}")
    if not devices:
        raise InvalidInput("--device", "no device given")
    return devices


@click.command("worker")
@click.option("--redis", "redis_url", envvar="SITH_REDIS_URL", required=True,
              help="Redis URL shared with the server (env SITH_REDIS_URL), e.g. redis://redis:6379/0.")
@click.option("--device", default=lambda: os.environ.get("SITH_DEVICE", "cpu"), show_default="SITH_DEVICE or cpu",
              help="cpu, cuda:N, a comma list of devices, or auto.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes per device.")
@click.option("--lease", "lease_s", default=60.0, show_default=True, type=click.FloatRange(1.0),
              help="Seconds without a heartbeat after which a job is reclaimed from its worker.")
@click.option("--plugin", "plugins", multiple=True, help="Module to import that registers extra job kinds.")
@click.option("--prefix", default="sith", show_default=True, help="Redis key prefix (one per deployment).")
def worker(redis_url: str, device: str, concurrency: int, lease_s: float, plugins: tuple[str, ...],
           prefix: str) -> None:
    """Consume jobs (decompose, explain, find, edit, ...) from Redis until SIGTERM/Ctrl-C."""
    from sith.cli.serve import require_service

    require_service("worker")
    from sith_workers.connection import RedisUnavailable, connect

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(message)s")
    devices = _devices(device)
    try:
        connect(redis_url).ping()
    except Exception as exc:  # noqa: BLE001 - redis errors of any kind mean "cannot start"
        raise click.ClickException(str(RedisUnavailable(f"Redis at {redis_url} is unavailable: {exc}"))) from exc
    # The pool imports the engine (torch, open_clip: seconds), so only after Redis answered.
    from sith_workers.pool import WorkerPool
    from sith_workers.worker import WorkerSettings

    settings = WorkerSettings.from_env(redis_url, prefix=prefix, lease_s=lease_s, plugins=plugins)
    pool = WorkerPool(settings, devices, concurrency).start()
    click.echo(f"sith worker: {len(pool.slots)} process(es) on {', '.join(devices)}; Ctrl-C to stop", err=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: pool.request_stop())
    pool.wait()
    pool.stop()


def register(group: click.Group) -> None:
    group.add_command(worker)
