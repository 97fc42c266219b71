"""DownloadEdit throughput over loopback against a local read of the same file, in the same run.

A real server (real Redis, no worker needed) serves one READY edit whose exported artifact is a
``--mib`` MiB file of random bytes under the server's data folder (the edit record is written
through ``sith_workers.edits.EditStore``, as a worker would). Measured, alternating, ``--repeats``
times each (the best and the median are printed):

* local read: ``open(path).read(chunk)`` until EOF (page cache warm: the server reads the same way);
* stream: the raw ``DownloadEdit`` stream consumed and dropped (the transport alone);
* SDK: ``Client.download`` (sha256 over every byte, written to a temp file, fsynced, renamed).

Target: the stream at ≥ 30 % of the local read.

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


def local_read(path: Path, chunk: int) -> int:
    total = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            total += len(block)
    return total


def main() -> None:
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
                              models=(str(model),), data_dir=tmp_path / "data")
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

            out = tmp_path / "download.safetensors"
            with sith_client.Client(address, timeout=600) as c:
                def sdk() -> int:
                    return c.download(name, out).stat().st_size

                runs = {"local read": lambda: local_read(artifact, DOWNLOAD_CHUNK), "stream": stream, "SDK": sdk}
                for fn in runs.values():                 # warm the page cache, channel and threads
                    assert fn() == size
                times: dict[str, list[float]] = {k: [] for k in runs}
                for _ in range(args.repeats):
                    for label, fn in runs.items():
                        start = time.perf_counter()
                        assert fn() == size
                        times[label].append(time.perf_counter() - start)
            channel.close()
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
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, Python {platform.python_version()}; shared with "
        f"other jobs, load average {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} at the end. One {mib:.0f} MiB "
        f"artifact, chunks of {DOWNLOAD_CHUNK >> 20} MiB over loopback (127.0.0.1), {args.repeats} alternating runs.",
        "",
        "| path | best (MiB/s) | median (MiB/s) | best vs local read |",
        "|---|---|---|---|",
    ]
    for label in times:
        lines.append(f"| {label} | {best[label]:,.0f} | {median[label]:,.0f} | {best[label] / best['local read']:.0%} |")
    lines += ["", f"Stream / local read (medians): **{median['stream'] / median['local read']:.0%}** "
              f"(target ≥ 30 %); SDK download (sha256 + write + fsync) / local read: "
              f"{median['SDK'] / median['local read']:.0%}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.record:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
