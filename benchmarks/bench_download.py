"""DownloadEdit throughput over loopback against a local read of the same file, in the same run.

A real server (real Redis, no worker needed) serves one READY edit whose exported artifact is a
``--mib`` MiB file of random bytes under the server's data folder (the edit record is written
through ``sith_workers.edits.EditStore``, as a worker would). Measured, alternating, ``--repeats``
times each (the best and the median are printed):

* local read: ``open(path).read(chunk)`` until EOF (page cache warm: the server reads the same way);
* gRPC ceiling: a bare gRPC server in this process yielding one static pre-encoded 8 MiB message
  (no file, no protobuf on either side): the most gRPC Python moves here, whatever the server does;
* gRPC stream: the raw ``DownloadEdit`` stream consumed and dropped (the transport alone);
* loopback TCP ceiling: a raw socket answered with ``sendfile`` and read with ``recv_into`` one
  buffer (no HTTP, no Python per byte): what any transport over 127.0.0.1 reaches on this machine;
* HTTP (signed URL): ``GetDownloadUrl`` then one GET of the URL, read with ``readinto`` into one
  buffer and dropped (the transport alone; the server answers with ``socket.sendfile``);
* local verified copy: what the SDK does to the bytes without a network (sha256, temp file, fsync,
  rename): the floor of any durable, verified download on this disk;
* SDK gRPC / SDK HTTP: ``Client.download(transport=...)`` (sha256 over every byte, written to a temp
  file, fsynced, renamed): what a user waits for.

Target: a download transport at ≥ 30 % of the local read (medians, same run).

    python benchmarks/bench_download.py                 # prints a table
    python benchmarks/bench_download.py --record        # also appends it to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HTTP_BUFFER = 4 << 20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def local_read(path: Path, chunk: int) -> int:
    total = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            total += len(block)
    return total


def local_copy(path: Path, out: Path, chunk: int) -> int:
    """What the SDK does to the bytes, without the network: sha256, write a temp file, fsync, rename."""
    import hashlib

    digest, total = hashlib.sha256(), 0
    view = memoryview(bytearray(chunk))         # one buffer, as the SDK's HTTP path uses
    tmp = out.with_name(out.name + ".part")
    with path.open("rb", buffering=0) as src, tmp.open("wb") as dst:
        while n := src.readinto(view):
            digest.update(view[:n])
            dst.write(view[:n])
            total += n
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out)
    return total


def main() -> None:
    from _common import report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="artifact size in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis", default=os.environ.get("SITH_TEST_REDIS_URL", "redis://127.0.0.1:6379/5"))
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import grpc

    import sith_client
    from sith_api.v1 import sith_pb2 as pb
    from sith_api.v1 import sith_pb2_grpc as rpc
    from sith_client._base import DOWNLOAD_CHUNK
    from sith_server.app import build
    from sith_server.config import ServerConfig
    from sith_workers.connection import connect
    from sith_workers.edits import EditStore
    from sith_workers.embedded import EmbeddedRedis

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_model_folder

    redis_url, embedded = args.redis, None
    try:
        connect(redis_url, connect_timeout=0.5, retries=0).ping()
    except Exception:  # noqa: BLE001 - any failure: use an embedded Redis instead
        embedded = EmbeddedRedis().start()
        redis_url = embedded.url
    prefix = f"benchdl-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="sith-bench-dl-") as tmp:
        tmp_path = Path(tmp)
        model = tiny_model_folder(tmp_path / "tiny")
        config = ServerConfig(grpc_address="127.0.0.1:0", metrics_port=0, redis_url=redis_url, auth_disabled=True,
                              models=(str(model),), data_dir=tmp_path / "data", download_port=0)
        server = build(config, prefix=prefix).start()
        client_redis = connect(redis_url)
        try:
            store = EditStore(client_redis, prefix)
            edit_id = store.new_id()
            artifact = tmp_path / "data" / "edits" / "default" / f"{edit_id}.safetensors"
            artifact.parent.mkdir(parents=True)
            import hashlib

            digest = hashlib.sha256()
            with artifact.open("wb") as f:
                for _ in range(args.mib):
                    block = os.urandom(1 << 20)
                    digest.update(block)
                    f.write(block)
            size = artifact.stat().st_size
            spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["red"], action=pb.EditOperation.SUPPRESS)])
            store.create("default", edit_id, spec, server.deps.runtime.default.loaded.hash)
            store.attach_job("default", edit_id, "0" * 32)
            store.ready("default", edit_id, pb.EditPlan(spec=spec), b"", pb.Artifact(
                filename=artifact.name, size_bytes=size, sha256=digest.hexdigest()), str(artifact))
            name = f"tenants/default/edits/{edit_id}"
            address = f"127.0.0.1:{server.port}"
            channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 17 << 20)])
            stub = rpc.EditsStub(channel)

            def stream() -> int:
                got = 0
                for chunk in stub.DownloadEdit(pb.DownloadEditRequest(name=name, chunk_bytes=DOWNLOAD_CHUNK),
                                               timeout=600):
                    got += len(chunk.data)
                return got

            import http.client
            from urllib.parse import urlsplit

            def http_get() -> int:
                url = urlsplit(stub.GetDownloadUrl(pb.GetDownloadUrlRequest(name=name), timeout=30).url)
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
                conn.request("GET", f"{url.path}?{url.query}")
                response = conn.getresponse()
                assert response.status == 200, response.status
                view, got = memoryview(buffer), 0
                while n := response.readinto(view):
                    got += n
                conn.close()
                return got

            # The transport's ceiling: a bare gRPC server yielding one static pre-encoded message (no file,
            # no protobuf on either side), the same message size and receive limit as the SDK.
            from concurrent import futures

            static = os.urandom(DOWNLOAD_CHUNK)
            count = -(-size // DOWNLOAD_CHUNK)

            def static_stream(request, context):
                for _ in range(count):
                    yield static

            bare = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", 17 << 20)])
            raw = grpc.unary_stream_rpc_method_handler(static_stream, request_deserializer=bytes,
                                                       response_serializer=bytes)
            bare.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bare", {"Get": raw}),))
            bare_port = bare.add_insecure_port("127.0.0.1:0")
            bare.start()
            bare_channel = grpc.insecure_channel(f"127.0.0.1:{bare_port}",
                                                 options=[("grpc.max_receive_message_length", 17 << 20)])
            bare_call = bare_channel.unary_stream("/bench.Bare/Get", request_serializer=bytes,
                                                  response_deserializer=bytes)

            def ceiling() -> int:
                return sum(len(m) for m in bare_call(b"", timeout=600))

            # The loopback TCP ceiling: a raw socket answered with sendfile, read with recv_into one buffer
            # (no HTTP, no Python per byte): what any transport over 127.0.0.1 can reach here.
            import socket
            import threading

            listener = socket.create_server(("127.0.0.1", 0))

            def raw_server() -> None:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        return
                    with conn, artifact.open("rb") as f:
                        conn.recv(16)
                        conn.sendfile(f)

            threading.Thread(target=raw_server, daemon=True).start()

            def raw_tcp() -> int:
                got = 0
                with socket.create_connection(listener.getsockname()) as s:
                    s.sendall(b"go")
                    view = memoryview(buffer)
                    while n := s.recv_into(view):
                        got += n
                return got

            buffer = bytearray(HTTP_BUFFER)
            out = tmp_path / "download.safetensors"
            with sith_client.Client(address, timeout=600) as c:
                def sdk_grpc() -> int:
                    return c.download(name, out, transport="grpc").stat().st_size

                def sdk_http() -> int:
                    return c.download(name, out, transport="http").stat().st_size

                runs = {"local read": lambda: local_read(artifact, DOWNLOAD_CHUNK),
                        "gRPC ceiling (static message, no file)": ceiling, "gRPC stream": stream,
                        "loopback TCP ceiling (raw sendfile → recv_into)": raw_tcp,
                        "HTTP (signed URL)": http_get,
                        "local verified copy (sha256 + write + fsync)": lambda: local_copy(artifact, out, HTTP_BUFFER),
                        "SDK gRPC": sdk_grpc, "SDK HTTP": sdk_http}
                for fn in runs.values():                 # warm the page cache, channel and threads
                    assert fn() >= size
                times: dict[str, list[float]] = {k: [] for k in runs}
                for _ in range(args.repeats):
                    for label, fn in runs.items():
                        start = time.perf_counter()
                        got = fn()
                        times[label].append(time.perf_counter() - start)
                        assert got >= size, (label, got)
            channel.close()
            bare_channel.close()
            bare.stop(grace=0)
            listener.close()
        finally:
            server.stop(grace=1)
            for key in client_redis.scan_iter(match=f"{prefix}:*", count=1000):
                client_redis.delete(key)
            if embedded is not None:
                embedded.stop()

    mib = size / 2**20
    best = {k: mib / min(v) for k, v in times.items()}
    median = {k: mib / statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()
    lines = [
        f"## Downloads (bench_download.py) — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}; shared with "
        f"other jobs, load average {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} at the end. One {mib:.0f} MiB "
        f"artifact over loopback (127.0.0.1): gRPC messages of {DOWNLOAD_CHUNK >> 20} MiB, HTTP read into one "
        f"{HTTP_BUFFER >> 20} MiB buffer, local read in {DOWNLOAD_CHUNK >> 20} MiB blocks; {args.repeats} alternating "
        "runs (the server runs in this process: its threads and the client's share the GIL and the 2 cores).",
        "",
        "| path | best (MiB/s) | median (MiB/s) | median vs local read |",
        "|---|---|---|---|",
    ]
    for label in times:
        lines.append(f"| {label} | {best[label]:,.0f} | {median[label]:,.0f} | {median[label] / median['local read']:.0%} |")
    local = median["local read"]
    lines += ["", f"Medians against the local read: gRPC stream **{median['gRPC stream'] / local:.0%}**, "
              f"HTTP signed URL **{median['HTTP (signed URL)'] / local:.0%}** (target ≥ 30 %: "
              f"{'met' if max(median['gRPC stream'], median['HTTP (signed URL)']) >= 0.3 * local else 'MISSED'}); "
              f"SDK (sha256 + write + fsync) over gRPC {median['SDK gRPC'] / local:.0%}, over HTTP "
              f"{median['SDK HTTP'] / local:.0%} — against a local verified copy of the same file (the floor for "
              f"a durable, verified download), SDK over HTTP "
              f"{median['SDK HTTP'] / median['local verified copy (sha256 + write + fsync)']:.0%}, over gRPC "
              f"{median['SDK gRPC'] / median['local verified copy (sha256 + write + fsync)']:.0%}. "
              f"Loopback TCP ceiling: {median['loopback TCP ceiling (raw sendfile → recv_into)'] / local:.0%}; "
              f"gRPC ceiling (no file, no protobuf): "
              f"{median['gRPC ceiling (static message, no file)'] / local:.0%}. HTTP / gRPC stream: "
              f"{median['HTTP (signed URL)'] / median['gRPC stream']:.1f}×.", ""]
    report("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
