"""`sith serve` as a user runs it: embedded Redis, one worker process, metrics, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_support import tiny_model_folder

from sith.engine.models import FOLDER_CONFIG, FOLDER_WEIGHTS, TESTBED_DIR
from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(channel: grpc.Channel, process: subprocess.Popen, timeout: float = 120) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode(errors="replace")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError("sith serve never became SERVING")


def test_sith_serve_embedded_default_runs_jobs_and_stops_cleanly(tmp_path):
    """No SITH_REDIS_URL, no tokens, no SITH_MODELS: the embedded default (the testbed model when
    its checkpoint is installed, else a tiny stand-in so the service path is still exercised)."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITH_")}
    env.update(SITH_DATA_DIR=str(tmp_path / "data"), SITH_DEVICE="cpu",
               SITH_GRPC_ADDRESS=f"127.0.0.1:{port}", SITH_METRICS_PORT=str(metrics_port))
    expected = "testbed-main"
    if not ((TESTBED_DIR / FOLDER_CONFIG).is_file() and (TESTBED_DIR / FOLDER_WEIGHTS).is_file()):
        env["SITH_MODELS"] = str(tiny_model_folder(tmp_path / "tiny"))
        expected = "tiny"
    sith = Path(sys.executable).parent / "sith"
    process = subprocess.Popen([str(sith), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, process)
            models = pb_grpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), timeout=5).models  # no token
            assert [(m.name, m.is_default) for m in models] == [(expected, True)]
            op = pb_grpc.AnalysisStub(channel).Decompose(pb.DecomposeRequest(layers=[0]), timeout=5)
            final = list(pb_grpc.OperationsStub(channel).WatchOperation(pb.WatchOperationRequest(name=op.name),
                                                                        timeout=300))[-1]
            assert final.metadata.state == pb.OperationMetadata.SUCCEEDED, final
            # An edit end to end: the worker `sith serve` started exports it into the data folder it
            # shares with the server, which streams it.
            import sith_client

            with sith_client.Client(f"grpc://127.0.0.1:{port}", timeout=60) as c:
                concept = "red" if expected == "testbed-main" else "dog"
                try:
                    edit = c.wait(c.edit(suppress=[concept], strength=0.5, layers=[-1], top_n=2,
                                         operator="sith_scale"), timeout=600)
                except sith_client.InvalidArgument:      # the stand-in model's vocabulary lacks the word
                    edit = None
                if edit is not None:
                    path = c.download(edit, tmp_path / "edited.safetensors")
                    assert path.stat().st_size == edit.artifact.size_bytes
                    assert all(v.alpha == 0.5 for v in edit.plan.affected)
                    assert (tmp_path / "data" / "edits" / "default" / edit.artifact.filename).is_file()
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            assert 'sith_grpc_requests_total{code="OK",method="/sith.v1.Models/ListModels"}' in text
            assert "sith_queue_depth" in text and "sith_model_loads_total" in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read().decode(errors="replace")
    assert "embedded Redis" in stderr and "auth disabled" in stderr
