"""SDK pieces that need no SITH server: packaging, errors, retries, download, types, CLI plumbing.

Retries are exercised against a real localhost port with nothing listening (gRPC's own
UNAVAILABLE), never a mocked channel.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import sith_client
from sith_api import bounds
from sith_api.v1 import sith_pb2 as pb
from sith_client import errors
from sith_client._base import BaseClient, images_to_proto
from sith_client._channel import Connection
from sith_client._download import AtomicDownload
from sith_client._progress import ProgressBar
from sith_client.cli import main as cli_main
from sith_client.jobs import Edit, Job
from sith_client.types import EditOp, Embeddings, numpy_to_tensor, tensor_to_numpy

edit_spec = BaseClient._edit_spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAST = sith_client.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


# --- packaging -------------------------------------------------------------------------------------


def test_import_does_not_pull_torch() -> None:
    code = ("import sys, sith_client, sith_client.cli, sith_client.aio; "
            "bad = [m for m in ('torch', 'open_clip', 'sith', 'sith_server', 'sith_workers', 'redis') "
            "if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_client_pyproject_declares_no_torch() -> None:
    import tomllib

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "client" / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"]).lower()
    assert "torch" not in deps and "open_clip" not in deps and "sith-api" in deps
    assert project["scripts"]["sith-client"] == "sith_client.cli:main"


# --- retries -----------------------------------------------------------------------------------------


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    p = sith_client.RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=0.5, multiplier=2)
    assert list(sith_client.RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=0.5,
                                        jitter=False).delays()) == [0.1, 0.2, 0.4, 0.5, 0.5]
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    for seed in range(20):
        delays = list(p.delays(random.Random(seed)))
        assert len(delays) == 5 and all(0 <= d <= c for d, c in zip(delays, caps))
    assert list(p.delays(random.Random(1))) == list(p.delays(random.Random(1)))
    with pytest.raises(ValueError):
        sith_client.RetryPolicy(max_attempts=0)


def test_unavailable_is_retried_then_raised_quickly() -> None:
    port = free_port()
    start = time.monotonic()
    with sith_client.Client(f"127.0.0.1:{port}", retry=FAST, timeout=5) as c:
        with pytest.raises(sith_client.Unavailable) as info:
            c.models()
    assert info.value.attempts == 3
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "after 3 attempts" in str(info.value)
    assert time.monotonic() - start < 3


def test_default_policy_gives_up_within_a_second_or_two() -> None:
    with sith_client.Client(f"127.0.0.1:{free_port()}") as c:
        start = time.monotonic()
        with pytest.raises(sith_client.Unavailable) as info:
            c.embed_texts(["a red square"])
        assert info.value.attempts == sith_client.RetryPolicy().max_attempts
        assert time.monotonic() - start < 3


def test_create_edit_is_retried_because_it_carries_a_request_id() -> None:
    with sith_client.Client(f"127.0.0.1:{free_port()}", retry=FAST) as c:
        with pytest.raises(sith_client.Unavailable) as info:
            c.edit(suppress=["red"])
    assert info.value.attempts == 3


def test_retry_none_means_one_attempt() -> None:
    with sith_client.Client(f"127.0.0.1:{free_port()}", retry=None) as c:
        with pytest.raises(sith_client.Unavailable) as info:
            c.models()
    assert info.value.attempts == 1


def test_async_client_retries_on_unavailable() -> None:
    async def go() -> tuple[int, int]:
        async with sith_client.AsyncClient(f"127.0.0.1:{free_port()}", retry=FAST) as c:
            with pytest.raises(sith_client.Unavailable) as read:
                await c.models()
            with pytest.raises(sith_client.Unavailable) as create:
                await c.edit(suppress=["red"])
            return read.value.attempts, create.value.attempts

    assert asyncio.run(asyncio.wait_for(go(), 10)) == (3, 3)


# --- errors ------------------------------------------------------------------------------------------


def _pack(*msgs: object) -> list[any_pb2.Any]:
    out = []
    for m in msgs:
        a = any_pb2.Any()
        a.Pack(m)
        out.append(a)
    return out


def test_invalid_argument_exposes_field_and_suggestions_as_data() -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="concepts[0]", description="unknown concept 'rde'")
    info = error_details_pb2.ErrorInfo(reason="UNKNOWN_VALUE", domain="sith.v1", metadata={"field": "concepts[0]"})
    suggestions = pb.Suggestions(field="concepts[0]", values=["red", "rod", "reed"])
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="concepts[0]: unknown concept",
                               details=_pack(error_details_pb2.BadRequest(field_violations=[violation]), info,
                                             suggestions))
    err = errors.from_status(status)
    assert isinstance(err, sith_client.InvalidArgument) and isinstance(err, sith_client.SithError)
    assert err.field == "concepts[0]"
    assert err.field_violations[0].suggestions == ("red", "rod", "reed")
    assert err.suggestions == ["red", "rod", "reed"]
    assert "did you mean: red, rod, reed?" in str(err)
    assert err.error_info.reason == "UNKNOWN_VALUE"
    # Prose in a description is never mistaken for suggestions.
    prose = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, details=_pack(error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="x", description="did you mean: y?")])))
    assert errors.from_status(prose).suggestions == []


def test_status_codes_map_to_typed_errors() -> None:
    resource = error_details_pb2.ResourceInfo(resource_type="model", resource_name="nope")
    nf = errors.from_status(status_pb2.Status(code=code_pb2.NOT_FOUND, message="model 'nope' not found",
                                              details=_pack(resource, pb.Suggestions(field="model", values=["tiny"]))))
    assert isinstance(nf, sith_client.NotFound) and nf.resource == "nope" and nf.resource_type == "model"
    assert nf.suggestions == ["tiny"]
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))
    ex = errors.from_status(status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, details=_pack(retry)))
    assert isinstance(ex, sith_client.ResourceExhausted) and ex.retry_after == 2.0
    assert isinstance(errors.from_status(status_pb2.Status(code=code_pb2.UNAUTHENTICATED)), sith_client.Unauthenticated)
    assert isinstance(errors.from_status(status_pb2.Status(code=code_pb2.UNAVAILABLE)), sith_client.Unavailable)
    assert type(errors.from_status(status_pb2.Status(code=99))) is errors.Unknown


def test_failed_job_raises_the_jobs_own_error_type() -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="concepts[0]", description="unknown")
    op = pb.Operation(name="operations/ab12", done=True,
                      metadata=pb.OperationMetadata(kind="find", state=pb.OperationMetadata.FAILED),
                      error=status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="unknown concept",
                                              details=_pack(error_details_pb2.BadRequest(field_violations=[violation]),
                                                            pb.Suggestions(field="concepts[0]", values=["red"]))))
    job = Job(op, pb.FindConceptResponse)
    with pytest.raises(sith_client.InvalidArgument) as info:
        job.result()
    assert isinstance(info.value, sith_client.JobFailed)
    assert info.value.operation == "operations/ab12" and info.value.suggestions == ["red"]

    cancelled = pb.Operation(name="operations/cd34", done=True,
                             metadata=pb.OperationMetadata(kind="explain", state=pb.OperationMetadata.CANCELLED),
                             error=status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled"))
    with pytest.raises(sith_client.JobFailed) as info2:
        Job(cancelled).result()
    assert isinstance(info2.value, errors.Cancelled) and Job(cancelled).state == "cancelled"
    running = Job(pb.Operation(name="operations/ef", metadata=pb.OperationMetadata(state=pb.OperationMetadata.RUNNING)))
    with pytest.raises(sith_client.SithError):
        running.result()                        # a handle holds data; waiting is the client's job


def test_succeeded_job_unpacks_the_typed_result() -> None:
    result = pb.ExplainHeadsResponse(heads=[pb.HeadExplanation(
        layer=3, head=1, theme=[pb.Concept(name="red", score=0.5)],
        vectors=[pb.VectorExplanation(layer=3, head=1, index=0, sigma=2.5, concepts=[pb.Concept(name="red", score=0.7)])])])
    op = pb.Operation(name="operations/ef56", done=True,
                      metadata=pb.OperationMetadata(kind="explain", state=pb.OperationMetadata.SUCCEEDED, progress=1))
    op.response.Pack(result)
    for job in (Job(op, pb.ExplainHeadsResponse), Job(op)):           # re-attached jobs read the type_url
        (head,) = job.result().heads
        assert (head.layer, head.head) == (3, 1) and head.vectors[0].concepts[0].name == "red"
        assert not head.vectors[0].HasField("fidelity") and head.theme[0].score == 0.5
    with pytest.raises(sith_client.SithError):
        Job(op, pb.FindConceptResponse).result()                       # a different type is an error
    plain = pb.Operation(name="operations/x", done=True,
                         metadata=pb.OperationMetadata(state=pb.OperationMetadata.SUCCEEDED))
    plain.response.Pack(struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=1)}))
    assert Job(plain).result()["n"] == 1                                # extension kinds: a Struct


def test_edit_handle_holds_data() -> None:
    msg = pb.Edit(name="tenants/t/edits/" + "a" * 32, state=pb.Edit.FAILED,
                  spec=pb.EditSpec(operations=[pb.EditOperation(concepts=["red"], action=pb.EditOperation.SUPPRESS)]),
                  error=status_pb2.Status(code=code_pb2.CANCELLED, message="the edit's job was cancelled"))
    edit = Edit(msg)
    assert (edit.id, edit.state, edit.plan, edit.artifact) == ("a" * 32, "failed", None, None)
    assert "suppress red" in repr(edit)
    with pytest.raises(sith_client.JobFailed) as info:
        edit.check()
    assert isinstance(info.value, errors.Cancelled)
    assert not hasattr(edit, "wait") and not hasattr(Job(pb.Operation()), "wait")


# --- download ----------------------------------------------------------------------------------------


def _chunks(payload: bytes, size: int = 7) -> list[tuple[bytes, int]]:
    return [(payload[i:i + size], i) for i in range(0, len(payload), size)]


def test_download_verifies_and_renames_atomically(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5
    target = tmp_path / "out.safetensors"
    with AtomicDownload(target) as d:
        d.begin(filename="edit.safetensors", total_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
        for data, offset in _chunks(payload):
            d.write(data, offset)
            assert not target.exists()          # nothing visible until verified
        assert d.commit() == target
    assert target.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_download_into_directory_uses_server_filename(tmp_path: Path) -> None:
    payload = b"weights"
    with AtomicDownload(tmp_path) as d:
        d.begin(filename="../../evil/edit-1.safetensors", total_bytes=len(payload),
                sha256=hashlib.sha256(payload).hexdigest())
        d.write(payload, 0)
        path = d.commit()
    assert path == tmp_path / "edit-1.safetensors" and path.read_bytes() == payload


def test_download_resumes_the_same_checkpoint_only(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 3
    digest = hashlib.sha256(payload).hexdigest()
    target = tmp_path / "out.safetensors"
    with AtomicDownload(target) as d:
        d.begin(filename="e.safetensors", total_bytes=len(payload), sha256=digest)
        d.write(payload[:300], 0)  # the stream drops here; the retry asks for offset d.written
        assert d.written == 300
        d.begin(filename="e.safetensors", total_bytes=len(payload), sha256=digest)  # resumed stream
        for data, offset in _chunks(payload[300:]):
            d.write(data, 300 + offset)
        assert d.commit() == target
    assert target.read_bytes() == payload
    with pytest.raises(sith_client.ChecksumMismatch):
        with AtomicDownload(tmp_path / "other.safetensors") as d:
            d.begin(filename="e.safetensors", total_bytes=len(payload), sha256=digest)
            d.write(payload[:10], 0)
            d.begin(filename="e.safetensors", total_bytes=len(payload), sha256="0" * 64)
    assert not (tmp_path / "other.safetensors").exists()


@pytest.mark.parametrize("problem", ["sha", "short", "order"])
def test_bad_download_leaves_old_file_and_no_temp(tmp_path: Path, problem: str) -> None:
    payload = b"0123456789" * 10
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")
    digest = hashlib.sha256(b"other" if problem == "sha" else payload).hexdigest()
    with pytest.raises(sith_client.ChecksumMismatch):
        with AtomicDownload(target) as d:
            d.begin(filename="x.safetensors", total_bytes=len(payload), sha256=digest)
            chunks = _chunks(payload)
            if problem == "short":
                chunks = chunks[:-1]
            if problem == "order":
                chunks = [chunks[1], chunks[0]] + chunks[2:]
            for data, offset in chunks:
                d.write(data, offset)
            d.commit()
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


# --- types and requests --------------------------------------------------------------------------------


def test_tensor_roundtrip_and_embeddings_are_numpy() -> None:
    a = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    back = tensor_to_numpy(numpy_to_tensor(a))
    assert back.dtype == np.float32 and back.flags.writeable and np.array_equal(a, back)
    emb = Embeddings.from_proto(pb.EmbedResponse(embeddings=numpy_to_tensor(a), model_hash="abc"))
    assert np.array_equal(np.asarray(emb), a) and emb.shape == (4, 8) and len(emb) == 4


def test_edit_spec_shortcuts_and_operations() -> None:
    spec = edit_spec("m", suppress=["red"], amplify="blue", strength=2.0, layers=[-1], top_n=4,
                     operations=[EditOp("scale", ["green"], 0.5, vectors=[(11, 2, 0)], operator="sith_scale")])
    assert [op.action for op in spec.operations] == [pb.EditOperation.SUPPRESS, pb.EditOperation.AMPLIFY,
                                                     pb.EditOperation.SCALE]
    sup, amp, sc = spec.operations
    assert sup.strength == 2.0 and amp.strength == 2.0 and list(amp.concepts) == ["blue"]
    assert sup.select.rule == pb.Selection.TOP_N and sup.select.n == 4 and list(sup.layers) == [-1]
    assert sc.select.rule == pb.Selection.EXPLICIT and sc.select.vectors[0].head == 2 and sc.operator == "sith_scale"
    plain = edit_spec(None, suppress="red")
    assert not plain.operations[0].HasField("select") and not plain.operations[0].HasField("strength")
    goals = edit_spec(None, suppress="red", target=0.1, preserve=["blue"], operator="head_project")
    assert (goals.operations[0].target, list(goals.operations[0].preserve)) == (0.1, ["blue"])
    assert edit_spec(None, flip="red", target=-0.5).operations[0].target == -0.5  # a flip aims below 0
    (debias,) = edit_spec(None, debias=["water", "land"]).operations
    assert debias.action == pb.EditOperation.DEBIAS and list(debias.concepts) == ["water", "land"]
    assert edit_spec(None, suppress="red", anchor="orange").operations[0].anchor == "orange"
    assert edit_spec(None, suppress="red").operations[0].anchor == ""  # "" = the planner's rule


def test_strength_is_honoured_for_every_action() -> None:
    """The issue's bug: suppress/flip dropped strength (α = 0 instead of 0.5)."""
    for action in ("suppress", "amplify", "flip", "scale", "debias"):
        (op,) = edit_spec(None, **{action: ["red"]}, strength=0.5).operations
        assert op.HasField("strength") and op.strength == 0.5, action


@pytest.mark.parametrize("kwargs, field", [
    ({}, "operations"),
    ({"suppress": "red", "top_n": 0}, "top_n"),
    ({"suppress": "red", "top_n": 100_001}, "top_n"),
    ({"suppress": "red", "strength": 11}, "strength"),
    ({"suppress": "red", "top_n": 3, "threshold": 0.2}, "operations"),
    ({"suppress": ["red"] * 17}, "spec.operations[0].concepts"),
])
def test_bad_edit_arguments_are_invalid_argument_before_sending(kwargs: dict, field: str) -> None:
    with pytest.raises(sith_client.InvalidArgument) as info:
        edit_spec(None, **kwargs)
    assert info.value.field in (field, field.removeprefix("spec.")), info.value.field


@pytest.mark.parametrize("call, field", [
    (lambda c: c.explain(k=0), "k"),
    (lambda c: c.explain(k=51), "k"),
    (lambda c: c.explain(coherence=1.5), "coherence"),
    (lambda c: c.find("red", top=0), "top"),
    (lambda c: c.find([]), "concepts"),
    (lambda c: c.embed_texts("x", edit="tenants/t/edits/" + "a" * 32), "edit"),
    (lambda c: c.edits(page_size=101).__next__(), "page_size"),
    (lambda c: c.match_heads("a", "b", profile="sparse"), "profile"),
])
def test_client_checks_the_same_bounds_as_the_server(call, field: str) -> None:
    """Rejected locally (nothing listens on the port), from the proto's declared bounds."""
    with sith_client.Client(f"127.0.0.1:{free_port()}", retry=None) as c:
        with pytest.raises(sith_client.InvalidArgument) as info:
            call(c)
    assert info.value.field == field


def test_bounds_come_from_the_proto() -> None:
    assert (bounds.limits(pb.ExplainHeadsRequest, "k").min, bounds.limits(pb.ExplainHeadsRequest, "k").max) == (1, 50)
    assert bounds.default(pb.FindConceptRequest, "top") == 20
    assert bounds.limits(pb.ExplainHeadsRequest, "coherence").max == 1


def test_images_accept_bytes_paths_arrays_and_batches(tmp_path: Path) -> None:
    f = tmp_path / "x.png"
    f.write_bytes(b"\x89PNG fake")
    batch = np.zeros((2, 3, 8, 8), np.float32)
    imgs = images_to_proto([b"jpegbytes", f, batch[0]])
    assert [i.WhichOneof("source") for i in imgs] == ["encoded", "encoded", "tensor"]
    assert imgs[1].encoded == b"\x89PNG fake" and list(imgs[2].tensor.shape) == [3, 8, 8]
    assert len(images_to_proto(batch)) == 2 and len(images_to_proto(str(f))) == 1
    with pytest.raises(sith_client.InvalidArgument):
        images_to_proto(np.zeros((8, 8), np.float32))


def test_connection_token_env_tls_and_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITH_TOKEN", "s3cret")
    monkeypatch.setenv("SITH_ADDRESS", "example:1234")
    c = Connection.resolve()
    assert c.address == "example:1234" and c.metadata == (("authorization", "Bearer s3cret"),)
    assert "s3cret" not in repr(c) and not c.tls
    assert Connection.resolve(token="explicit").token == "explicit"
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    assert Connection.resolve("h:1", root_certificates=pem).tls
    with pytest.raises(ValueError):
        Connection.resolve("h:1", tls=False, root_certificates=b"x")
    monkeypatch.delenv("SITH_TOKEN")
    assert Connection.resolve("h:1").metadata == ()


@pytest.mark.parametrize("address, host, tls", [
    ("grpc://localhost:50051", "localhost:50051", False),
    ("grpcs://sith.example:443", "sith.example:443", True),
    ("GRPCS://sith.example:443/", "sith.example:443", True),
    ("localhost:50051", "localhost:50051", False),
])
def test_grpc_and_grpcs_schemes(address: str, host: str, tls: bool) -> None:
    c = Connection.resolve(address)
    assert (c.address, c.tls) == (host, tls)


def test_unknown_scheme_and_contradictions_are_invalid_argument() -> None:
    for address in ("http://h:1", "grpc://", "grpc://h:1/path"):
        with pytest.raises(sith_client.InvalidArgument) as info:
            Connection.resolve(address)
        assert info.value.field == "address"
    with pytest.raises(ValueError):
        Connection.resolve("grpcs://h:1", tls=False)


def test_grpc_scheme_reaches_a_port_like_a_bare_address() -> None:
    with sith_client.Client(f"grpc://127.0.0.1:{free_port()}", retry=None) as c:
        with pytest.raises(sith_client.Unavailable) as info:
            c.models()
    assert "Misformatted" not in str(info.value)


def test_progress_bar_lines() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    op = pb.Operation(name="operations/1", metadata=pb.OperationMetadata(kind="explain", progress=0.5,
                                                                         message="layer 11", state=pb.OperationMetadata.RUNNING))
    job = Job(op)
    bar(job)
    bar(job)  # unchanged: not repeated
    assert out.getvalue() == "explain  [#####.....]  50%  layer 11\n"


def test_cli_unavailable_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["--address", f"127.0.0.1:{free_port()}", "models"])
    assert rc == 5
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_cli_rejects_empty_edit_locally(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["--address", f"127.0.0.1:{free_port()}", "edit"])
    assert rc == 2 and "at least one of" in capsys.readouterr().err


@pytest.mark.slow
def test_wheel_metadata_has_no_torch(tmp_path: Path) -> None:
    """What ``pip install ./client`` would pull: the built wheel's Requires-Dist."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(root / "client"), "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("sith_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip().lower() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not any(r.startswith(("torch", "open-clip", "open_clip")) for r in requires)
    assert {"sith_client/py.typed", "sith_client/cli.py"} <= set(names)
    assert not any(n.startswith("sith_client/v1/") for n in names)        # stubs live in sith-api
    assert any(r.startswith("sith-api") for r in requires)
