"""`sith worker` argument handling (the pool itself is exercised in test_workers_e2e)."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from sith.cli import main
from sith.cli.worker import _devices
from sith.engine.errors import InvalidInput
from sith_workers.embedded import free_port


def test_unreachable_redis_exits_quickly_with_a_clear_message():
    start = time.monotonic()
    result = CliRunner().invoke(main, ["worker", "--redis", f"redis://127.0.0.1:{free_port()}/0"])
    assert result.exit_code == 1 and "is unavailable" in result.output
    assert time.monotonic() - start < 5.0


def test_device_lists():
    assert _devices("cpu") == ["cpu"]
    assert _devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert _devices("auto")[0] in ("cpu", "cuda:0")
    with pytest.raises(InvalidInput, match="--device"):
        _devices("gpu0")
