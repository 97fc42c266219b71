"""Shared pieces of the server tests: a tiny real CLIP on disk, a real server on localhost, and
a real Redis (db 5 of 127.0.0.1:6379, one key prefix per server so runs never collide).
The tiny model itself is defined once, in conftest.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis
from conftest import TINY_CFG, WORDS, tiny_model_folder  # noqa: F401 - re-exported for the tests

from sith_server.app import SithServer, build
from sith_server.config import ServerConfig
from sith_server.vocabulary import Vocabulary
from sith_workers.connection import connect
from sith_workers.embedded import EmbeddedRedis

REDIS_URL = os.environ.get("SITH_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
_embedded: EmbeddedRedis | None = None


def shared_redis_url() -> str:
    """The shared test Redis when one answers, else one embedded Redis for this test session."""
    global _embedded
    if _embedded is not None:
        return _embedded.url
    client = connect(REDIS_URL, connect_timeout=0.5, retries=0)
    try:
        client.ping()
        return REDIS_URL
    except redis.RedisError:
        _embedded = EmbeddedRedis().start()
        return _embedded.url
    finally:
        client.close()


@dataclass
class Running:
    server: SithServer
    channel: grpc.Channel
    prefix: str
    address: str
    redis_url: str

    def worker(self):
        """A worker thread on this server's queue, Redis and data folder (where it exports edits)."""
        return worker_thread(self.prefix, self.redis_url, self.server.deps.config.data_dir)

    def cleanup_redis(self) -> None:
        client = connect(self.redis_url, connect_timeout=0.5, retries=0)
        try:
            for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
                client.delete(key)
        except redis.RedisError:
            pass          # a test that stopped its own Redis
        finally:
            client.close()


@contextmanager
def running_server(models: list[str], *, tokens_file: Path | None = None, data_dir: Path | None = None,
                   redis_url: str | None = None, words: list[str] = WORDS, **build_kwargs) -> Iterator[Running]:
    """A real server on 127.0.0.1:<free port>; auth on when ``tokens_file`` is given."""
    prefix = f"sithtest-{uuid.uuid4().hex[:10]}"
    redis_url = redis_url or shared_redis_url()
    config = ServerConfig(grpc_address="127.0.0.1:0", metrics_port=0, redis_url=redis_url,
                          auth_tokens_file=tokens_file, auth_disabled=tokens_file is None,
                          models=tuple(models), data_dir=data_dir or Path("/tmp") / prefix)
    server = build(config, prefix=prefix, vocabulary=Vocabulary(words), **build_kwargs).start()
    address = f"127.0.0.1:{server.port}"
    channel = grpc.insecure_channel(address)
    running = Running(server, channel, prefix, address, redis_url)
    try:
        yield running
    finally:
        channel.close()
        server.stop(grace=1)
        running.cleanup_redis()


@contextmanager
def worker_thread(prefix: str, url: str | None = None, data_dir: Path | None = None) -> Iterator[object]:
    """A real sith_workers.Worker consuming this server's queue in a thread (connects by URL)."""
    from workers_fixtures import running_worker

    with running_worker(None, prefix, redis_url=url or shared_redis_url(), block_ms=200,
                        data_dir=data_dir or Path("/tmp") / prefix) as worker:
        yield worker
