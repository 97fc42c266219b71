"""Re-run issue 15's attacks against a real server process and print the figures (docs/server.md).

The server runs in its own process (so its memory and CPU time are measured alone) with auth on,
the embedded testbed model, and a Redis server this script starts on a free port (it SIGSTOPs that
one, never a shared Redis). Usage: ``python benchmarks/bench_hardening.py [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc

TENANTS = {"alice": "tok-alice", "bob": "tok-bob", "carol": "tok-carol"}
# A checkpoint larger than what HTTP/2 windows and gRPC's buffers absorb (a 23 MB testbed checkpoint now
# fits them, so its unread stream ends on the server at once); ViT-B/32's is about 600 MB.
ARTIFACT_BYTES = 128 * 2**20
SERVER = """
import sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
from sith_server.app import build
from sith_server.config import ServerConfig
config = ServerConfig(grpc_address="127.0.0.1:0", metrics_port={metrics}, redis_url={redis!r},
                      auth_tokens_file=Path({tokens!r}), data_dir=Path({data!r}), vocabulary="testbed")
server = build(config, prefix="bench").start()
print(server.port, flush=True)
server.wait()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def md(tenant: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TENANTS[tenant]}")]


class Proc:
    """RSS, peak RSS and CPU seconds of a process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rss_mib(self) -> tuple[float, float]:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def cpu_s(self) -> float:
        parts = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def png(width: int, height: int, mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def codes(results) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[r] = out.get(r, 0) + 1
    return out


def call(fn) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller counts (tokenizer words, metric calls)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sith-attack-"))
    tokens = root / "tokens"
    tokens.write_text("".join(f"{t} {n}\n" for n, t in TENANTS.items()))
    redis_port, metrics_port = free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(metrics=metrics_port, redis=url, tokens=str(tokens),
                                                                  data=str(root / "data"))],
                              stdout=subprocess.PIPE, env=env, text=True)
    results: dict[str, object] = {}
    try:
        port = int(server.stdout.readline())
        proc = Proc(server.pid)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
        emb = pb_grpc.EmbeddingsStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        emb.EmbedTexts(pb.EmbedTextsRequest(texts=["warm up"]), metadata=md("alice"), timeout=60)
        results["idle_rss_mib"] = proc.rss_mib()[0]

        # 1. decompression bombs: 12 concurrent requests x 2 one-bit PNGs of 39.6 Mpx; 32 in one request
        bomb = png(6000, 6600)
        rss0, cpu0 = proc.rss_mib()[0], proc.cpu_s()
        with ThreadPoolExecutor(12) as pool:
            out = list(pool.map(lambda i: call(lambda: emb.EmbedImages(pb.EmbedImagesRequest(
                images=[pb.Image(encoded=bomb)] * 2), metadata=md("bob"), timeout=30)), range(12)))
        results["bombs_12x2"] = {"bomb_bytes": len(bomb), "codes": codes(out),
                                 "rss_mib_before_after_peak": (rss0, *proc.rss_mib()), "cpu_s": proc.cpu_s() - cpu0}
        cpu0 = proc.cpu_s()
        out = [call(lambda: emb.EmbedImages(pb.EmbedImagesRequest(images=[pb.Image(encoded=bomb)] * 32),
                                            metadata=md("bob"), timeout=60))]
        results["bombs_32_in_one"] = {"request_kib": 32 * len(bomb) / 1024, "codes": codes(out),
                                      "cpu_s": proc.cpu_s() - cpu0}

        # 2. long texts: 8 x 10,000 random letters with a 3 s deadline; then many distinct words
        rng = random.Random(0)
        texts = ["".join(rng.choice(string.ascii_lowercase) for _ in range(10_000)) for _ in range(8)]
        cpu0, start = proc.cpu_s(), time.perf_counter()
        out = [call(lambda: emb.EmbedTexts(pb.EmbedTextsRequest(texts=texts), metadata=md("alice"), timeout=3))]
        results["long_texts_8x10k"] = {"codes": codes(out), "wall_s": time.perf_counter() - start,
                                       "cpu_s": proc.cpu_s() - cpu0}
        words = 100_000 if args.quick else 700_000
        rss0 = proc.rss_mib()[0]
        sent = 0
        trace = []
        while sent < words:
            batch = [" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(25))
                     for _ in range(200)]
            emb.EmbedTexts(pb.EmbedTextsRequest(texts=batch), metadata=md("alice"), timeout=120)
            sent += 25 * 200
            if sent % 100_000 == 0:
                trace.append(round(proc.rss_mib()[0]))
        results["tokenizer_cache"] = {"distinct_words": sent, "rss_mib_before_after": (rss0, proc.rss_mib()[0]),
                                      "rss_mib_every_100k_words": trace}

        # 6 (server side). quotas: one tenant queues 40 jobs as fast as it can (no worker runs them)
        analysis = pb_grpc.AnalysisStub(channel)
        start = time.perf_counter()
        combos = [(layer, head, k) for k in (1, 2, 3) for layer in range(6) for head in range(4)]  # 40 distinct jobs
        out = [call(lambda: analysis.ExplainHeads(pb.ExplainHeadsRequest(layers=[c[0]], heads=[c[1]], k=c[2]),
                                                  metadata=md("carol"), timeout=10)) for c in combos[:40]]
        results["queue_40_jobs"] = {"codes": codes(out), "wall_s": time.perf_counter() - start}

        # 3. 70 unread DownloadEdit streams, then 15 calls of other tenants incl. liveness probes
        from sith_workers.connection import connect
        from sith_workers.edits import EditStore

        store = EditStore(connect(url), "bench")
        names = {}
        for tenant in ("alice", "bob"):
            edit_id = store.new_id()
            store.create(tenant, edit_id, pb.EditSpec(), "hash")
            store.attach_job(tenant, edit_id, "job")
            path = root / "data" / "edits" / tenant / f"{edit_id}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(ARTIFACT_BYTES))
            store.ready(tenant, edit_id, pb.EditPlan(), b"", pb.Artifact(filename=path.name, size_bytes=ARTIFACT_BYTES,
                                                                          sha256="0" * 64), str(path))
            names[tenant] = f"tenants/{tenant}/edits/{edit_id}"
        streams, refused, order = [], [], []
        for i in range(70):
            tenant = "alice" if i % 2 else "bob"
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            it = pb_grpc.EditsStub(ch).DownloadEdit(pb.DownloadEditRequest(name=names[tenant], chunk_bytes=1 << 20),
                                                    metadata=md(tenant), timeout=120)
            try:
                next(it)
                streams.append((ch, it))
                order.append(f"{i}:{tenant}:open")
            except grpc.RpcError as err:
                refused.append(err.code().name)
                order.append(f"{i}:{tenant}:{err.details()[:40]}")
                ch.close()

        def other(i: int) -> tuple[str, float]:
            start = time.perf_counter()
            if i % 3 == 0:
                code = call(lambda: health.Check(health_pb2.HealthCheckRequest(service="sith.v1.Models"), timeout=3))
            else:
                code = call(lambda: pb_grpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=md("carol"),
                                                                            timeout=3))
            return code, time.perf_counter() - start
        with ThreadPoolExecutor(15) as pool:
            out = list(pool.map(other, range(15)))
        if os.environ.get("BENCH_DEBUG"):
            print(order, file=sys.stderr)
        results["unread_streams_70"] = {"opened": len(streams), "refused": codes(refused),
                                        "other_calls": codes(c for c, _ in out),
                                        "other_max_s": max(s for _, s in out)}
        for ch, it in streams:
            it.cancel()
            ch.close()

        # 3b. idle reflection streams (no token needed), then another tenant's call
        import queue as queue_module

        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        held, refused = [], []
        for _ in range(70):
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            requests: queue_module.Queue = queue_module.Queue()
            it = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter(requests.get, None), timeout=120)
            requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
            try:
                next(it)
                held.append((ch, it, requests))
            except grpc.RpcError as err:
                refused.append(err.code().name)
                requests.put(None)
                ch.close()
        code = call(lambda: pb_grpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=md("carol"),
                                                                    timeout=3))
        results["idle_reflection_streams_70"] = {"opened": len(held), "refused": codes(refused), "tenant_call": code}
        for ch, it, requests in held:
            requests.put(None)
            it.cancel()
            ch.close()

        # 4. metrics cardinality: random method names, no token
        n = 1000 if args.quick else 5000
        before = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        for i in range(n):
            call(lambda: channel.unary_unary(f"/attack.S{i}/M{rng.random()}")(b"", timeout=5))
        start = time.perf_counter()
        after = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read()
        series = lambda body: sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))  # noqa: E731
        results["metrics_cardinality"] = {"calls": n, "series_before_after": (series(before), series(after)),
                                          "bytes_after": len(after), "scrape_s": time.perf_counter() - start}
        # 5. the metrics address
        try:
            ip = [a for a in socket.gethostbyname_ex(socket.gethostname())[2] if not a.startswith("127.")][0]
            urllib.request.urlopen(f"http://{ip}:{metrics_port}/metrics", timeout=2)
            results["metrics_on_external_ip"] = "reachable"
        except (IndexError, OSError) as exc:
            results["metrics_on_external_ip"] = f"refused ({type(exc).__name__})"

        # 7. a hung Redis: 70 waiting calls, 15 probes with a 3 s deadline
        ops = pb_grpc.OperationsStub(channel)
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            def waiting(i: int) -> tuple[str, float]:
                start = time.perf_counter()
                code = call(lambda: ops.GetOperation(pb.GetOperationRequest(name="operations/" + "0" * 32),
                                                     metadata=md("alice"), timeout=30))
                return code, time.perf_counter() - start
            with ThreadPoolExecutor(70) as pool:
                pending = pool.map(waiting, range(70))
                probes = []
                for _ in range(15):
                    start = time.perf_counter()
                    code = call(lambda: health.Check(health_pb2.HealthCheckRequest(service="sith.v1.Models"), timeout=3))
                    probes.append((code, time.perf_counter() - start))
                out = list(pending)
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        results["hung_redis"] = {"calls": codes(c for c, _ in out), "call_max_s": max(s for _, s in out),
                                 "probes": codes(c for c, _ in probes), "probe_max_s": max(s for _, s in probes)}

        # 11. a full Redis
        from sith_workers.connection import connect as rconnect
        r = rconnect(url)
        r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) + 1024))
        r.config_set("maxmemory-policy", "noeviction")
        i = 0
        for size in (65536, 1024, 64):
            while True:
                try:
                    r.set(f"fill:{i}", b"x" * size)
                    i += 1
                except Exception:  # noqa: BLE001 - OutOfMemoryError ends the fill
                    break
        out = []
        for _ in range(5):
            try:
                analysis.Decompose(pb.DecomposeRequest(), metadata=md("bob"), timeout=10)
                out.append("OK")
            except grpc.RpcError as err:
                out.append(f"{err.code().name}: {err.details()[:60]}")
        results["full_redis"] = codes(out)
        results["final_rss_mib"] = proc.rss_mib()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        os.kill(redis.pid, signal.SIGCONT)
        redis.kill()
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    threading.stack_size(0)
    main()
