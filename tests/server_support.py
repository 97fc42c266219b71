"""Shared pieces of the server tests: a tiny real CLIP on disk, a real server on localhost, and
a real Redis (db 5 of 127.0.0.1:6379, one key prefix per server so runs never collide)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import open_clip
import redis
import torch
from safetensors.torch import save_file

from sith_server.app import SithServer, build
from sith_server.config import ServerConfig
from sith_server.vocabulary import Vocabulary
from sith_workers.connection import connect
from sith_workers.embedded import EmbeddedRedis

REDIS_URL = os.environ.get("SITH_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
_embedded: EmbeddedRedis | None = None
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
WORDS = ["dog", "cat", "bird", "water", "land", "tree", "car", "house", "red", "blue", "green", "forest",
         "ocean", "beach", "mountain", "snow", "sky", "grass", "flower", "horse"]


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


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    """An open_clip hf-hub style folder (config + safetensors) with seeded random weights."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CFG).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@dataclass
class Running:
    server: SithServer
    channel: grpc.Channel
    prefix: str
    address: str
    redis_url: str

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
def worker_thread(prefix: str, url: str | None = None) -> Iterator[object]:
    """A real sith_workers.Worker consuming this server's queue in a thread."""
    from sith_workers.worker import Worker, WorkerSettings

    worker = Worker(WorkerSettings(redis_url=url or shared_redis_url(), prefix=prefix, block_ms=200))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=30)
