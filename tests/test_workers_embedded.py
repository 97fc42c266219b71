"""The embedded Redis that `sith serve` starts when no SITH_REDIS_URL is set."""

from __future__ import annotations

import pytest
import redis

from sith_workers.connection import RedisUnavailable, connect
from sith_workers.editstore import EditStore
from sith_workers.embedded import EmbeddedRedis


def test_starts_on_a_free_port_and_stops_with_its_owner():
    server = EmbeddedRedis().start()
    client = connect(server.url)
    assert client.ping() and server.url.startswith("redis://127.0.0.1:")
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
    process = server.process
    server.stop()
    assert process.poll() is not None
    with pytest.raises(RedisUnavailable):
        EditStore(client).list("t")
    server.stop()                                                  # idempotent


def test_edits_survive_a_restart_with_a_data_dir(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path) as first:
        EditStore(connect(first.url)).put("t", "e1", b"\x00mult", {"m": 1}, {"p": 2})
    with EmbeddedRedis(data_dir=tmp_path) as second:
        record = EditStore(connect(second.url)).get("t", "e1")
    assert record is not None and record.multipliers == b"\x00mult" and record.manifest == {"m": 1}


def test_two_servers_do_not_share_data():
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        connect(a.url).set("k", "a")
        assert a.port != b.port and connect(b.url).get("k") is None
        assert isinstance(connect(a.url), redis.Redis)
