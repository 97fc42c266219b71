"""Issue 15 against a real server and the real Redis: decompression bombs (1), long texts and call
deadlines (2), unread download streams and probe capacity (3), metrics cardinality (4), the metrics
bind address (5), a hung Redis (7) and a full Redis (11)."""

from __future__ import annotations

import io
import os
import random
import signal
import string
import subprocess
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from PIL import Image
from server_support import WORDS, Running, shared_redis_url, tiny_model_folder

from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_server import images, runtime
from sith_server.app import build
from sith_server.config import Limits, ServerConfig
from sith_server.vocabulary import Vocabulary
from sith_workers.connection import connect
from sith_workers.edits import EditStore

ALICE = [("authorization", "Bearer alice-token")]
BOB = [("authorization", "Bearer bob-token")]


@contextmanager
def hardened_server(root: Path, limits: Limits = Limits(), redis_url: str | None = None, metrics_port: int = 0,
                    grpc_address: str = "127.0.0.1:0", metrics_host: str | None = None):
    """A real server with auth on (tenants alice, bob, carol) and the given limits."""
    tokens = root / "tokens"
    tokens.write_text("alice-token alice\nbob-token bob\ncarol-token carol\n")
    prefix = f"sithtest-{uuid.uuid4().hex[:10]}"
    config = ServerConfig(grpc_address=grpc_address, metrics_port=metrics_port, redis_url=redis_url or shared_redis_url(),
                          auth_tokens_file=tokens, models=(str(tiny_model_folder(root / "tiny")),),
                          data_dir=root / "data", limits=limits, metrics_host=metrics_host)
    server = build(config, prefix=prefix, vocabulary=Vocabulary(WORDS)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    running = Running(server, channel, prefix, f"127.0.0.1:{server.port}", config.redis_url)
    try:
        yield running
    finally:
        channel.close()
        server.stop(grace=1)
        images.configure(Limits())
        running.cleanup_redis()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    limits = Limits(image_max_pixels=4_000_000, request_max_pixels=6_000_000, inflight_max_pixels=8_000_000,
                    inflight_wait_s=0.3)
    with hardened_server(tmp_path_factory.mktemp("hardening"), limits) as running:
        yield running


def _details(err: grpc.RpcError) -> dict:
    status = rpc_status.from_call(err)
    out = {}
    for detail in status.details if status else ():
        for kind in (error_details_pb2.QuotaFailure, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo,
                     error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                out[kind.__name__] = message
    return out


def _png(width: int, height: int, mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _embed(srv, images_bytes, metadata=ALICE, timeout=30):
    request = pb.EmbedImagesRequest(images=[pb.Image(encoded=b) for b in images_bytes])
    return pb_grpc.EmbeddingsStub(srv.channel).EmbedImages(request, metadata=metadata, timeout=timeout)


# ---- 1. decompression bombs ----------------------------------------------------------------------

def test_a_decompression_bomb_is_refused_from_its_header(srv):
    bomb = _png(6000, 6600)                                         # 39.6 Mpx of one-bit zeros
    assert len(bomb) < 10_000
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        _embed(srv, [_png(32, 32, "RGB"), bomb])
    elapsed = time.perf_counter() - start
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "images[1].encoded" in err.value.details() and "4000000" in err.value.details()
    # Decoding and converting 40 Mpx takes far longer than reading a header: it was never decoded.
    assert elapsed < 0.5, elapsed


def test_the_per_request_pixel_budget_counts_every_image(srv):
    medium = _png(1500, 1500, "RGB")                                # 2.25 Mpx, under the per-image budget
    assert len(_embed(srv, [medium, medium]).embeddings.shape) == 2  # 4.5 Mpx: fine
    with pytest.raises(grpc.RpcError) as err:
        _embed(srv, [medium] * 3)                                    # 6.75 Mpx > 6 Mpx
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per-request" in err.value.details()


def test_the_in_flight_budget_is_shared_by_concurrent_requests(srv):
    medium = _png(1500, 1500, "RGB")
    budget = images.current_budget()
    with budget.in_flight.take(7_000_000, "another request"):      # others are decoding 7 of 8 Mpx
        with pytest.raises(grpc.RpcError) as err:
            _embed(srv, [medium])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in err.value.details()
    assert budget.in_flight.used == 0
    assert len(_embed(srv, [medium]).embeddings.data) > 0            # budget back: it goes through


def test_garbage_and_unsupported_formats_are_invalid_arguments(srv):
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    for data, what in ((b"not an image", "not a PNG or JPEG"), (gif.getvalue(), "expected PNG or JPEG")):
        with pytest.raises(grpc.RpcError) as err:
            _embed(srv, [data])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in err.value.details()


# ---- 2. long texts, tokenizer cache, deadlines -------------------------------------------------

def _random_letters(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def test_long_texts_are_cut_before_tokenising(srv):
    stub = pb_grpc.EmbeddingsStub(srv.channel)
    texts = [_random_letters(10_000, seed) for seed in range(8)]
    start = time.perf_counter()
    out = stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts), metadata=ALICE, timeout=30)
    assert time.perf_counter() - start < 3.0                       # was 34.5 s of CPU
    assert list(out.embeddings.shape)[0] == 8
    # A text that fits the context is embedded exactly as open_clip would.
    loaded = srv.server.deps.runtime.default.loaded
    short = "a photo of a dog on the beach"
    assert runtime.clip_text(short, runtime.context_length(loaded)) == short


def test_the_tokenizer_cache_stays_bounded(srv, monkeypatch):
    monkeypatch.setattr(runtime, "TOKENIZER_CACHE_ENTRIES", 300)
    loaded = srv.server.deps.runtime.default.loaded
    tokenizer = runtime.inner_tokenizer(loaded.tokenizer)
    if isinstance(getattr(tokenizer, "cache", None), runtime.BoundedCache):
        tokenizer.cache.limit = 300
    stub = pb_grpc.EmbeddingsStub(srv.channel)
    rng = random.Random(1)
    for batch in range(5):                                          # 5 x 100 texts x 10 distinct words
        texts = [" ".join(_random_letters(6, rng.random()) for _ in range(10)) for _ in range(100)]
        stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts), metadata=ALICE, timeout=60)
    tokenizer = runtime.inner_tokenizer(loaded.tokenizer)
    assert isinstance(tokenizer.cache, runtime.BoundedCache)
    assert len(tokenizer.cache) <= 300


def test_work_stops_when_the_deadline_passes(srv):
    stub = pb_grpc.EmbeddingsStub(srv.channel)
    rng = random.Random(2)
    texts = [" ".join(_random_letters(60, rng.random()) for _ in range(10)) for _ in range(512)]
    registry = srv.server.deps.metrics.registry

    def ended_calls() -> float:
        return sum(registry.get_sample_value("sith_grpc_requests_total",
                                             {"method": "/sith.v1.Embeddings/EmbedTexts", "code": code}) or 0
                   for code in ("DEADLINE_EXCEEDED", "CANCELLED"))
    before = ended_calls()
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts), metadata=ALICE, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def ended() -> bool:
        return ended_calls() > before
    while not ended() and time.monotonic() - start < 20:
        time.sleep(0.02)
    stopped_after = time.monotonic() - start
    # Tokenising 512 such texts takes seconds; the server gave up within one batch of the deadline.
    assert ended() and stopped_after < 1.5, stopped_after


# ---- 3. unread streams, probes on reserved capacity ---------------------------------------------

def _ready_edit(srv, tenant: str, size: int) -> str:
    """A READY edit of ``tenant`` whose artifact is ``size`` bytes (written as a worker would)."""
    store = EditStore(srv.server.deps.redis, srv.prefix)
    edit_id = store.new_id()
    store.create(tenant, edit_id, pb.EditSpec(), srv.server.deps.runtime.default.loaded.hash)
    store.attach_job(tenant, edit_id, "job")
    path = Path(srv.server.config.data_dir) / "edits" / tenant / f"{edit_id}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    store.ready(tenant, edit_id, pb.EditPlan(), b"", pb.Artifact(filename=path.name, size_bytes=size,
                                                                  sha256="0" * 64), str(path))
    return f"tenants/{tenant}/edits/{edit_id}"


def test_unread_download_streams_are_capped_and_probes_still_answer(tmp_path):
    limits = Limits(grpc_threads=16, reserved_threads=4, max_streams=6, max_streams_per_tenant=4)
    with hardened_server(tmp_path, limits) as srv:
        names = {t: _ready_edit(srv, t, 64 * 2**20) for t in ("alice", "bob")}
        stub = pb_grpc.EditsStub(srv.channel)
        opened, refused = [], []
        channels = []
        for i in range(30):                                         # nobody reads these streams
            tenant, metadata = ("alice", ALICE) if i < 10 else ("bob", BOB)
            channel = grpc.insecure_channel(srv.address)            # one connection each, like separate clients
            channels.append(channel)
            call = pb_grpc.EditsStub(channel).DownloadEdit(
                pb.DownloadEditRequest(name=names[tenant], chunk_bytes=1 << 20), metadata=metadata, timeout=60)
            try:
                next(call)                                          # the first chunk, then never again
                opened.append(call)
            except grpc.RpcError as err:
                refused.append(err)
        assert len(opened) == 6                                     # 4 alice (her cap) + 2 bob (the total cap)
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused) and len(refused) == 24
        assert sum("streams_per_tenant" in e.details() for e in refused) == 6     # alice's 5th..10th
        assert sum("the server has 6 open streams" in e.details() for e in refused) == 18
        # Probes and other calls still answer at once.
        health = health_pb2_grpc.HealthStub(srv.channel)
        models = pb_grpc.ModelsStub(srv.channel)

        def probe(i: int) -> float:
            start = time.perf_counter()
            if i % 3:
                assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=3).status == \
                    health_pb2.HealthCheckResponse.SERVING
            else:
                models.ListModels(pb.ListModelsRequest(), metadata=BOB, timeout=3)
            return time.perf_counter() - start
        with ThreadPoolExecutor(15) as pool:
            latencies = list(pool.map(probe, range(15)))
        assert max(latencies) < 3.0
        for call in opened:
            call.cancel()
        for channel in channels:
            channel.close()
        # Slots come back when the streams end.
        time.sleep(0.5)
        again = stub.DownloadEdit(pb.DownloadEditRequest(name=names["alice"], chunk_bytes=1 << 20), metadata=ALICE,
                                  timeout=30)
        assert next(again).total_bytes == 64 * 2**20
        again.cancel()


def test_the_gate_rejects_excess_calls_fast_and_keeps_probes_free(tmp_path):
    """Fill every admissible thread with long WatchOperation streams: the excess is refused at once
    (RESOURCE_EXHAUSTED, not queued) and health checks keep answering from the reserve."""
    # 16 threads, 12 reserved: the gate admits 4 calls (the servicer's own watch cap, 8, is never reached).
    limits = Limits(grpc_threads=16, reserved_threads=12, max_streams=4, max_streams_per_tenant=4)
    with hardened_server(tmp_path, limits) as srv:
        analysis = pb_grpc.AnalysisStub(srv.channel)
        ops = pb_grpc.OperationsStub(srv.channel)
        op = analysis.Decompose(pb.DecomposeRequest(), metadata=ALICE, timeout=10)    # queued: no worker runs
        watches, errors = [], []
        lock = threading.Lock()

        def watch() -> None:
            try:
                for _ in ops.WatchOperation(pb.WatchOperationRequest(name=op.name), metadata=ALICE, timeout=8):
                    pass
            except grpc.RpcError as err:
                with lock:
                    errors.append((err.code(), err.details()))

        for _ in range(20):
            thread = threading.Thread(target=watch, daemon=True)
            thread.start()
            watches.append(thread)
        time.sleep(1.0)
        refused = [d for c, d in errors if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) >= 16, errors                            # at most 4 admitted
        assert all("limit of 4 concurrent calls" in d for d in refused)
        health = health_pb2_grpc.HealthStub(srv.channel)
        for _ in range(15):
            start = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
            assert time.perf_counter() - start < 1.0
        for thread in watches:
            thread.join(15)


# ---- 4, 5. metrics ----------------------------------------------------------------------------

def test_metrics_count_after_auth_and_fold_unknown_methods(tmp_path):
    with hardened_server(tmp_path, metrics_port=0) as srv:
        for i in range(300):                                        # random methods, no token
            method = f"/sith.v1.Nope{i}/Call{i}"
            with pytest.raises(grpc.RpcError):
                srv.channel.unary_unary(method)(b"", timeout=5)
        for i in range(50):                                         # random methods, a valid token
            with pytest.raises(grpc.RpcError) as err:
                srv.channel.unary_unary(f"/x.Y{i}/Z")(b"", metadata=ALICE, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        series = [m for metric in srv.server.deps.metrics.registry.collect() for m in metric.samples
                  if m.name.startswith("sith_grpc_requests")]
        methods = {s.labels["method"] for s in series}
        assert not any("Nope" in m or "/x.Y" in m for m in methods)
        assert "unknown" in methods and len(series) < 10
        rejected = srv.server.deps.metrics.rejections.labels("unauthenticated")._value.get()
        assert rejected == 300


def test_metrics_bind_the_grpc_host_by_default(tmp_path):
    assert ServerConfig(grpc_address="127.0.0.1:50051").metrics_bind == "127.0.0.1"
    assert ServerConfig(grpc_address="[::1]:50051").metrics_bind == "::1"
    assert ServerConfig(grpc_address="127.0.0.1:1", metrics_host="0.0.0.0").metrics_bind == "0.0.0.0"
    with hardened_server(tmp_path, metrics_port=0) as srv:
        srv.server.deps.metrics.stop_serving()
        port = srv.server.deps.metrics.serve(0, srv.server.config.metrics_bind)
        bound = srv.server.deps.metrics._http.server_address[0]
        assert bound == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "sith_grpc_rejected" in body or "sith_queue_depth" in body


# ---- 7, 11. a hung Redis and a full Redis -----------------------------------------------------

@contextmanager
def own_redis_server(tmp_path: Path, *args: str):
    """A redis-server process this test owns (SIGSTOP / maxmemory are safe on it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = connect(url, connect_timeout=0.5, retries=0)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    try:
        yield url, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)


@pytest.mark.skipif(not subprocess.run(["which", "redis-server"], capture_output=True).stdout, reason="no redis-server")
def test_a_hung_redis_fails_calls_fast_and_probes_stay_prompt(tmp_path):
    with own_redis_server(tmp_path) as (url, proc), hardened_server(tmp_path, redis_url=url) as srv:
        ops = pb_grpc.OperationsStub(srv.channel)
        ops_name = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(), metadata=ALICE, timeout=10).name
        os.kill(proc.pid, signal.SIGSTOP)                           # Redis hangs: connections open, no replies
        try:
            def call(_i: int) -> tuple[grpc.StatusCode, float]:
                start = time.perf_counter()
                try:
                    ops.GetOperation(pb.GetOperationRequest(name=ops_name), metadata=ALICE, timeout=10)
                    return grpc.StatusCode.OK, time.perf_counter() - start
                except grpc.RpcError as err:
                    return err.code(), time.perf_counter() - start
            with ThreadPoolExecutor(30) as pool:
                calls = pool.map(call, range(70))
                health = health_pb2_grpc.HealthStub(srv.channel)
                probes = []
                for _ in range(15):
                    start = time.perf_counter()
                    health.Check(health_pb2.HealthCheckRequest(service="sith.v1.Models"), timeout=3)
                    probes.append(time.perf_counter() - start)
                results = list(calls)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert max(probes) < 3.0
        assert {code for code, _ in results} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any(code == grpc.StatusCode.UNAVAILABLE for code, _ in results)
        assert max(seconds for code, seconds in results if code == grpc.StatusCode.UNAVAILABLE) <= 1.0 + 0.5


@pytest.mark.skipif(not subprocess.run(["which", "redis-server"], capture_output=True).stdout, reason="no redis-server")
def test_a_full_redis_is_unavailable_with_a_retry_hint_not_internal(tmp_path):
    with own_redis_server(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction") as (url, _proc), \
            hardened_server(tmp_path, redis_url=url) as srv:
        filler = connect(url)
        i = 0
        for size in (256 * 1024, 16 * 1024, 1024, 64):               # fill it, to the last bytes, with no-TTL data
            while True:
                try:
                    filler.set(f"fill:{i}", b"x" * size)
                    i += 1
                except redis.OutOfMemoryError:
                    break
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(), metadata=ALICE, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "full" in err.value.details()
        assert "RetryInfo" in _details(err.value)


# ---- 6. quotas through the API; dead letters in the metrics ---------------------------------------

def test_queued_jobs_quota_through_the_api_and_dead_letters_in_metrics(tmp_path):
    with hardened_server(tmp_path, Limits(max_queued_jobs_per_tenant=3)) as srv:
        analysis = pb_grpc.AnalysisStub(srv.channel)
        for head in range(3):                                        # distinct jobs (identical ones are shared)
            analysis.ExplainHeads(pb.ExplainHeadsRequest(layers=[0], heads=[head]), metadata=ALICE, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            analysis.ExplainHeads(pb.ExplainHeadsRequest(layers=[0], heads=[3]), metadata=ALICE, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = _details(err.value)
        assert details["ErrorInfo"].metadata["resource"] == "queued_jobs" and details["ErrorInfo"].metadata["limit"] == "3"
        assert "RetryInfo" in details and "QuotaFailure" in details
        analysis.ExplainHeads(pb.ExplainHeadsRequest(layers=[0], heads=[3]), metadata=BOB, timeout=10)   # bob is fine
        # A job that exhausts its attempts shows in sith_dead_letters.
        queue = srv.server.deps.queue
        queue.ensure_group()
        [delivery] = queue.fetch("w", 100)
        queue.start(delivery.job_id, "w", max_attempts=1)
        [delivery] = queue.reclaim("w2", 0)
        assert queue.start(delivery.job_id, "w2", max_attempts=1) is None
        assert srv.server.deps.metrics.registry.get_sample_value("sith_dead_letters") == 1


def _reflection_stream(address: str):
    """An open reflection stream (no token needed) that then sits idle; (channel, call, request queue)."""
    import queue

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(address)
    requests: queue.Queue = queue.Queue()

    def gen():
        while (item := requests.get()) is not None:
            yield item
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(gen(), timeout=60)
    requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
    return channel, call, requests


def test_idle_reflection_streams_without_a_token_cannot_fill_the_server(tmp_path):
    """Reflection is open to anyone and each idle stream holds a thread: without its own cap, 12
    anonymous streams took every admitted call of this server and tenants got RESOURCE_EXHAUSTED."""
    with hardened_server(tmp_path, Limits(grpc_threads=16, reserved_threads=4, max_streams=4)) as srv:
        opened, refused = [], []
        for _ in range(20):
            channel, call, requests = _reflection_stream(srv.address)
            try:
                next(call)
                opened.append((channel, call, requests))
            except grpc.RpcError as err:
                refused.append(err.code())
                requests.put(None)
                channel.close()
        assert len(opened) == 2 and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert pb_grpc.ModelsStub(srv.channel).ListModels(pb.ListModelsRequest(), metadata=ALICE, timeout=3).models
        for channel, call, requests in opened:
            requests.put(None)
            call.cancel()
            channel.close()


def test_one_tenant_cannot_take_every_admitted_call(tmp_path):
    limits = Limits(grpc_threads=16, reserved_threads=4, max_calls_per_tenant=3, max_streams=4)
    with hardened_server(tmp_path, limits) as srv:
        op = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(), metadata=ALICE, timeout=10)
        ops = pb_grpc.OperationsStub(srv.channel)
        watches = [ops.WatchOperation(pb.WatchOperationRequest(name=op.name, detach=True), metadata=ALICE, timeout=30)
                   for _ in range(3)]
        for watch in watches:
            next(watch)                                              # three long calls of alice's are running
        with pytest.raises(grpc.RpcError) as err:
            ops.GetOperation(pb.GetOperationRequest(name=op.name), metadata=ALICE, timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "calls_per_tenant" in err.value.details()
        assert pb_grpc.ModelsStub(srv.channel).ListModels(pb.ListModelsRequest(), metadata=BOB, timeout=3).models
        for watch in watches:
            watch.cancel()
