"""A bounded soak (issue 15, "Also"): three tenants make mixed calls for ~45 s against a real server,
a real worker process and a Redis server this test owns, while the worker is SIGKILLed (and
replaced) and Redis is restarted. Nothing accepted is lost, every call ends with a proper status,
and the server's memory stays flat."""

from __future__ import annotations

import io
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from test_hardening_server import ALICE, BOB, hardened_server

from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_server.config import Limits
from sith_workers.connection import connect
from workers_fixtures import start_worker_process, stop_processes

CAROL = [("authorization", "Bearer carol-token")]
# Statuses a well-behaved server may answer under these faults; INTERNAL / UNKNOWN never.
PROPER = {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "NOT_FOUND", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION"}
DURATION_S = 45.0


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class OwnRedis:
    """A redis-server on a fixed port and directory, restartable with its data (AOF, fsync always)."""

    def __init__(self, root: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.root), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = connect(self.url, connect_timeout=0.5, retries=0)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()                  # SIGTERM: Redis flushes its AOF and exits
            self.proc.wait(15)


@pytest.mark.slow
@pytest.mark.skipif(not subprocess.run(["which", "redis-server"], capture_output=True).stdout, reason="no redis-server")
def test_soak_with_worker_kill_and_redis_restart(tmp_path):
    own = OwnRedis(tmp_path)
    own.start()
    limits = Limits(image_max_pixels=1_000_000, request_max_pixels=2_000_000, inflight_max_pixels=4_000_000,
                    max_queued_jobs_per_tenant=8)
    workers: list[subprocess.Popen] = []
    try:
        with hardened_server(tmp_path, limits, redis_url=own.url) as srv:
            workers.append(start_worker_process(own.url, srv.prefix, lease_s=3.0))
            stop = threading.Event()
            statuses: Counter[str] = Counter()
            operations: set[str] = set()
            lock = threading.Lock()
            image = io.BytesIO()
            Image.new("RGB", (48, 48), (200, 30, 30)).save(image, format="PNG")
            small, big = image.getvalue(), io.BytesIO()
            Image.new("1", (2000, 2000)).save(big, format="PNG")       # 4 Mpx: over the per-image budget

            def client(metadata, seed: int) -> None:
                rng = random.Random(seed)
                emb = pb_grpc.EmbeddingsStub(srv.channel)
                analysis = pb_grpc.AnalysisStub(srv.channel)
                ops = pb_grpc.OperationsStub(srv.channel)
                models = pb_grpc.ModelsStub(srv.channel)
                while not stop.is_set():
                    kind = rng.randrange(6)
                    try:
                        if kind == 0:
                            emb.EmbedTexts(pb.EmbedTextsRequest(texts=[f"a red {rng.random()}", "x" * 5000]),
                                           metadata=metadata, timeout=10)
                        elif kind == 1:
                            emb.EmbedImages(pb.EmbedImagesRequest(images=[pb.Image(encoded=small)] * 2),
                                            metadata=metadata, timeout=10)
                        elif kind == 2:
                            emb.EmbedImages(pb.EmbedImagesRequest(images=[pb.Image(encoded=big.getvalue())]),
                                            metadata=metadata, timeout=10)
                        elif kind == 3:
                            op = analysis.Decompose(pb.DecomposeRequest(layers=[rng.randrange(3)]),
                                                    metadata=metadata, timeout=10)
                            with lock:
                                operations.add((op.name, tuple(metadata)))
                        elif kind == 4:
                            op = analysis.ExplainHeads(pb.ExplainHeadsRequest(layers=[rng.randrange(3)],
                                                                              heads=[rng.randrange(4)],
                                                                              k=rng.randrange(1, 4)),
                                                       metadata=metadata, timeout=10)
                            with lock:
                                operations.add((op.name, tuple(metadata)))
                            ops.GetOperation(pb.GetOperationRequest(name=op.name), metadata=metadata, timeout=10)
                        else:
                            models.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
                        code = "OK"
                    except grpc.RpcError as err:
                        code = err.code().name
                        if code not in PROPER:
                            code = f"{code}: {err.details()}"
                    with lock:
                        statuses[code] += 1
                    time.sleep(rng.random() * 0.05)

            threads = [threading.Thread(target=client, args=(md, i), daemon=True)
                       for i, md in enumerate([ALICE, BOB, CAROL, ALICE, BOB, CAROL])]
            for t in threads:
                t.start()
            rss: list[float] = []
            probes: list[float] = []
            health = health_pb2_grpc.HealthStub(srv.channel)
            start = time.monotonic()
            killed = restarted = False
            while time.monotonic() - start < DURATION_S:
                elapsed = time.monotonic() - start
                if not killed and elapsed > 12:
                    workers[0].send_signal(signal.SIGKILL)              # the worker dies mid-whatever
                    workers[0].wait(10)
                    workers.append(start_worker_process(own.url, srv.prefix, lease_s=3.0))
                    killed = True
                if not restarted and elapsed > 24:
                    own.stop()
                    time.sleep(1.0)
                    own.start()                                         # the same data, back from the AOF
                    restarted = True
                t0 = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(service="sith.v1.Models"), timeout=3)
                probes.append(time.perf_counter() - t0)
                rss.append(_rss_mib())
                time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(30)

            # Nothing accepted is lost: every operation a client was given finishes.
            ops = pb_grpc.OperationsStub(srv.channel)
            unfinished = dict.fromkeys(operations)
            deadline = time.monotonic() + 180
            while unfinished and time.monotonic() < deadline:
                for name, metadata in list(unfinished):
                    try:
                        op = ops.GetOperation(pb.GetOperationRequest(name=name), metadata=list(metadata), timeout=10)
                    except grpc.RpcError as err:
                        if err.code() == grpc.StatusCode.UNAVAILABLE:
                            continue
                        raise
                    if op.done:
                        assert op.metadata.state == pb.OperationMetadata.SUCCEEDED, op
                        del unfinished[(name, metadata)]
                time.sleep(0.5)
            stop_processes(workers)                                     # before the server's keys go
    finally:
        stop_processes(workers)
        own.stop()
    bad = {code: n for code, n in statuses.items() if code not in PROPER}
    assert not bad, bad
    assert statuses["OK"] > 100 and statuses["RESOURCE_EXHAUSTED"] > 0, statuses
    assert len(operations) > 10 and not unfinished, f"{len(unfinished)} of {len(operations)} operations never finished"
    assert max(probes) < 3.0
    third = max(len(rss) // 3, 1)
    growth = max(rss[-third:]) - max(rss[third:2 * third])
    print(f"soak: {sum(statuses.values())} calls {dict(statuses)}, {len(operations)} operations, "
          f"rss {rss[third]:.0f} -> {rss[-1]:.0f} MiB, probe max {max(probes):.2f}s")
    assert growth < 64, f"server memory grew by {growth:.0f} MiB in the last third"
