"""Shared test fixtures: the tiny CLIP every service test uses, defined once.

Service tests (server, workers, SDK) build a real open_clip model from ``TINY_CFG`` with seeded
random weights, save it as an open_clip folder and serve it through a real server, real Redis
and real workers. Library tests with other shapes keep their own configs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# The concept vocabulary the service tests serve (a custom list: explanations and names stay small).
WORDS = ["dog", "cat", "bird", "water", "land", "tree", "car", "house", "red", "blue", "green", "forest",
         "ocean", "beach", "mountain", "snow", "sky", "grass", "flower", "horse"]


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    """An open_clip hf-hub style folder (config + safetensors) with seeded random weights."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CFG).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


# ---- Redis for the worker and queue tests (real Redis; a unique key prefix per test) ------------

SHARED_REDIS_URL = os.environ.get("SITH_TEST_REDIS_URL", "redis://127.0.0.1:6379/6")


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def shared(prefix: str) -> Iterator:
    """A client of the shared Redis (db 6); the test's keys (its prefix) are deleted afterwards.
    Without a shared Redis the tests run against an embedded one."""
    import redis

    from sith_workers.connection import connect
    from sith_workers.embedded import EmbeddedRedis

    embedded = None
    client = connect(SHARED_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError:
        embedded = EmbeddedRedis().start()
        client = connect(embedded.url)
    yield client
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    if embedded:
        embedded.stop()


@pytest.fixture
def own_redis() -> Iterator:
    """A Redis server only this test uses (free to flush)."""
    from sith_workers.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One tiny model folder for the whole session (seed 0)."""
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny")
