"""The embedded Redis that `sith serve` starts when no SITH_REDIS_URL is set."""

from __future__ import annotations

import pytest
import redis

from sith_workers.connection import RedisUnavailable, connect
from sith_api.v1 import sith_pb2 as pb
from sith_workers.edits import EditStore
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
        EditStore(client).list("t", 0, 10)
    server.stop()                                                  # idempotent


def test_edits_survive_a_restart_with_a_data_dir(tmp_path):
    edit_id = "e" * 32
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["red"], action=pb.EditOperation.SUPPRESS)])
    with EmbeddedRedis(data_dir=tmp_path) as first:
        store = EditStore(connect(first.url))
        store.create("t", edit_id, spec, "h" * 64)
        store.attach_job("t", edit_id, "j" * 32)
        store.ready("t", edit_id, pb.EditPlan(spec=spec), b"\x00mult", pb.Artifact(size_bytes=3), "/x")
    with EmbeddedRedis(data_dir=tmp_path) as second:
        record = EditStore(connect(second.url)).get("t", edit_id)
    assert record is not None and record.multipliers == b"\x00mult" and record.state == "ready"
    assert record.edit.spec == spec and record.edit.name == f"tenants/t/edits/{edit_id}"


def test_two_servers_do_not_share_data():
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        connect(a.url).set("k", "a")
        assert a.port != b.port and connect(b.url).get("k") is None
        assert isinstance(connect(a.url), redis.Redis)
