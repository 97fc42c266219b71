"""Long-running operations end to end: a real server, real Redis and a real worker (thread)."""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from google.rpc import code_pb2
from safetensors.torch import load_file
from server_support import running_server, tiny_model_folder, worker_thread

from sith.edits.export import read_manifest
from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    with running_server([str(tiny_model_folder(root / "tiny"))], data_dir=root / "data") as running:
        yield running


def watch_until_done(channel, name: str, timeout: float = 120) -> list[pb.Operation]:
    return list(pb_grpc.OperationsStub(channel).WatchOperation(pb.WatchOperationRequest(name=name), timeout=timeout))


def response(op: pb.Operation, kind):
    """The operation's typed result (the Any must hold exactly ``kind``)."""
    message = kind()
    assert op.response.Unpack(message), op.response.type_url
    return message


def wait_state(channel, name: str, state, timeout: float = 30) -> pb.Operation:
    stub = pb_grpc.OperationsStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = stub.GetOperation(pb.GetOperationRequest(name=name), timeout=5)
        if op.metadata.state == state:
            return op
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached {state}: {op}")


def test_cancel_a_queued_operation(srv):
    op = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(layers=[1]), timeout=5)
    assert op.name.startswith("operations/") and not op.done
    assert op.metadata.state == pb.OperationMetadata.QUEUED and op.metadata.kind == "decompose"
    cancelled = pb_grpc.OperationsStub(srv.channel).CancelOperation(pb.CancelOperationRequest(name=op.name), timeout=5)
    assert cancelled.done and cancelled.error.code == code_pb2.CANCELLED
    assert cancelled.metadata.state == pb.OperationMetadata.CANCELLED


def test_client_cancelling_the_watch_cancels_the_job(srv):
    op = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(layers=[2]), timeout=5)
    stream = pb_grpc.OperationsStub(srv.channel).WatchOperation(pb.WatchOperationRequest(name=op.name), timeout=60)
    first = next(stream)
    assert first.name == op.name and not first.done
    stream.cancel()
    assert wait_state(srv.channel, op.name, pb.OperationMetadata.CANCELLED).error.code == code_pb2.CANCELLED


def test_watch_deadline_or_detach_leaves_the_job_alone(srv):
    op = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(layers=[0, 1]), timeout=5)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.OperationsStub(srv.channel).WatchOperation(pb.WatchOperationRequest(name=op.name), timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    stream = pb_grpc.OperationsStub(srv.channel).WatchOperation(
        pb.WatchOperationRequest(name=op.name, detach=True), timeout=60)
    next(stream)
    stream.cancel()
    time.sleep(0.5)
    again = pb_grpc.OperationsStub(srv.channel).GetOperation(pb.GetOperationRequest(name=op.name), timeout=5)
    assert again.metadata.state == pb.OperationMetadata.QUEUED
    pb_grpc.OperationsStub(srv.channel).CancelOperation(pb.CancelOperationRequest(name=op.name), timeout=5)


def test_decompose_and_explain_through_a_worker(srv):
    analysis = pb_grpc.AnalysisStub(srv.channel)
    with srv.worker():
        op = analysis.Decompose(pb.DecomposeRequest(layers=[-1]), timeout=5)
        events = watch_until_done(srv.channel, op.name)
        final = events[-1]
        assert final.done and final.metadata.state == pb.OperationMetadata.SUCCEEDED, final
        assert [e.metadata.progress for e in events] == sorted(e.metadata.progress for e in events)
        result = response(final, pb.DecomposeResponse)
        assert [layer.layer for layer in result.layers] == [2]
        spectrum = result.layers[0]
        assert (spectrum.heads, list(spectrum.singular_values.shape)) == (4, [4, spectrum.rank])
        assert result.model.name == "tiny" and len(result.model.hash) == 64
        # The same request again shares the finished job (dedupe).
        assert analysis.Decompose(pb.DecomposeRequest(layers=[2]), timeout=5).name == op.name

        op = analysis.ExplainHeads(pb.ExplainHeadsRequest(layers=[2], heads=[0], k=3), timeout=5)
        final = watch_until_done(srv.channel, op.name)[-1]
        assert final.metadata.state == pb.OperationMetadata.SUCCEEDED, final
        heads = response(final, pb.ExplainHeadsResponse).heads
        assert [(h.layer, h.head) for h in heads] == [(2, 0)]
        assert all((v.layer, v.head) == (2, 0) for v in heads[0].vectors)
        assert [v.index for v in heads[0].vectors] == sorted(v.index for v in heads[0].vectors)
        concepts = {c.name for v in heads[0].vectors for c in v.concepts}
        assert concepts and concepts <= set(srv.server.deps.vocabulary.custom)
        assert all(1 <= len(v.concepts) <= 3 for v in heads[0].vectors)
        registry = srv.server.deps.metrics.registry
        assert registry.get_sample_value("sith_cache_requests_total", {"result": "miss"}) >= 1
    assert srv.server.deps.metrics.registry.get_sample_value(
        "sith_job_duration_seconds_count", {"kind": "decompose", "state": "succeeded"}) >= 1


def test_edit_lifecycle_embed_and_download(srv):
    edits = pb_grpc.EditsStub(srv.channel)
    embeddings = pb_grpc.EmbeddingsStub(srv.channel)
    spec = pb.EditSpec(operations=[pb.EditOperation(
        concepts=["dog"], action=pb.EditOperation.SUPPRESS, layers=[1, 2],
        select=pb.Selection(rule=pb.Selection.TOP_N, n=6))])
    with srv.worker():
        edit = edits.CreateEdit(pb.CreateEditRequest(spec=spec), timeout=5)
        assert edit.state == pb.Edit.PENDING and edit.name.startswith("tenants/default/edits/")
        assert edit.spec == pb.EditSpec(operations=spec.operations, version=1)   # stored as sent
        with pytest.raises(grpc.RpcError) as err:   # not ready yet, or just became ready
            list(edits.DownloadEdit(pb.DownloadEditRequest(name=edit.name), timeout=5))
            pytest.skip("the edit finished before the precondition could be checked")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        final = watch_until_done(srv.channel, edit.operation)[-1]
        assert final.metadata.state == pb.OperationMetadata.SUCCEEDED, final
    done = response(final, pb.Edit)                       # AIP-151: the LRO's response is the resource
    assert (done.name, done.state) == (edit.name, pb.Edit.READY) and done.artifact.size_bytes > 0
    got = edits.GetEdit(pb.GetEditRequest(name=edit.name), timeout=5)
    assert got.state == pb.Edit.READY and got.spec.operations[0].concepts == ["dog"]
    assert got.artifact == done.artifact and got.update_time.ToNanoseconds() >= got.create_time.ToNanoseconds()
    plan = got.plan
    assert plan.spec == got.spec and plan.model.hash == got.base_model_hash
    assert 0 < len(plan.affected) <= 6 and all(a.layer in (1, 2) and a.alpha == 0.0 for a in plan.affected)
    assert {h.layer for h in plan.heads} <= {1, 2}
    assert edits.GetEdit(pb.GetEditRequest(name=edit.name.rpartition("/")[2]), timeout=5) == got   # bare id

    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    images = [pb.Image(tensor=pb.Tensor(shape=[3, 32, 32], data=p.tobytes())) for p in pixels]
    base = embeddings.EmbedImages(pb.EmbedImagesRequest(images=images), timeout=30)
    edited = embeddings.EmbedImages(pb.EmbedImagesRequest(images=images, target=pb.ModelRef(edit=edit.name)),
                                    timeout=60)
    assert edited.model_hash != base.model_hash
    assert edited.embeddings.data != base.embeddings.data
    with pytest.raises(grpc.RpcError) as err:   # edits change only the vision tower
        embeddings.EmbedTexts(pb.EmbedTextsRequest(texts=["a dog"], target=pb.ModelRef(edit=edit.name)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target.edit" in err.value.details()

    chunks = list(edits.DownloadEdit(pb.DownloadEditRequest(name=edit.name, chunk_bytes=1 << 20), timeout=120))
    assert len(chunks) > 1 and all(len(c.data) <= 1 << 20 for c in chunks)
    blob = b"".join(c.data for c in chunks)
    assert [c.offset for c in chunks] == [sum(len(x.data) for x in chunks[:i]) for i in range(len(chunks))]
    assert chunks[0].total_bytes == len(blob) == done.artifact.size_bytes
    assert chunks[0].sha256 == hashlib.sha256(blob).hexdigest() == done.artifact.sha256
    half = len(blob) // 2 + 3  # resume mid-chunk: the rest, announced as the same checkpoint
    rest = list(edits.DownloadEdit(pb.DownloadEditRequest(name=edit.name, offset=half), timeout=120))
    assert (rest[0].offset, rest[0].total_bytes, rest[0].sha256) == (half, len(blob), chunks[0].sha256)
    assert blob[:half] + b"".join(c.data for c in rest) == blob
    tail = list(edits.DownloadEdit(pb.DownloadEditRequest(name=edit.name, offset=len(blob)), timeout=30))
    assert len(tail) == 1 and tail[0].data == b"" and tail[0].sha256 == chunks[0].sha256
    with pytest.raises(grpc.RpcError) as err:
        list(edits.DownloadEdit(pb.DownloadEditRequest(name=edit.name, offset=len(blob) + 1), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "offset" in err.value.details()
    path = srv.server.deps.config.data_dir / "downloaded.safetensors"
    path.write_bytes(blob)
    state = load_file(str(path))
    served = srv.server.deps.runtime.edited(f"{done.name.rpartition('/')[2]}:{done.artifact.sha256}", lambda: None)
    for name, tensor in served.model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert read_manifest(path)["base_hash"] == got.base_model_hash

    edits.DeleteEdit(pb.DeleteEditRequest(name=edit.name), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        embeddings.EmbedImages(pb.EmbedImagesRequest(images=images, target=pb.ModelRef(edit=edit.name)), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert srv.server.deps.runtime.edited_in_memory == 0


def test_an_edit_that_fails_on_the_worker_is_failed_with_the_jobs_status(srv):
    """The worker settles the edit's one record in the step that fails the job."""
    edits = pb_grpc.EditsStub(srv.channel)
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["dog"], action=pb.EditOperation.SUPPRESS)])
    edit = edits.CreateEdit(pb.CreateEditRequest(spec=spec), timeout=5)
    cancelled = pb_grpc.OperationsStub(srv.channel).CancelOperation(
        pb.CancelOperationRequest(name=edit.operation), timeout=5)
    assert cancelled.error.code == code_pb2.CANCELLED
    got = edits.GetEdit(pb.GetEditRequest(name=edit.name), timeout=5)
    assert got.state == pb.Edit.FAILED and got.error.code == code_pb2.CANCELLED
    edits.DeleteEdit(pb.DeleteEditRequest(name=edit.name), timeout=5)


def test_concurrent_watchers_all_see_the_end(srv):
    op = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(layers=[0]), timeout=5)
    results: list[pb.Operation] = []
    threads = [threading.Thread(target=lambda: results.append(watch_until_done(srv.channel, op.name)[-1]))
               for _ in range(3)]
    with srv.worker():
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert len(results) == 3 and all(r.done and r.metadata.state == pb.OperationMetadata.SUCCEEDED for r in results)


def test_preview_plans_without_storing_an_edit(srv):
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["water"], action=pb.EditOperation.FLIP,
                                                    select=pb.Selection(rule=pb.Selection.TOP_N, n=3))])
    edits = pb_grpc.EditsStub(srv.channel)
    before = {e.name for e in edits.ListEdits(pb.ListEditsRequest(), timeout=5).edits}
    with srv.worker():
        op = edits.PreviewEdit(pb.PreviewEditRequest(spec=spec), timeout=5)
        final = watch_until_done(srv.channel, op.name)[-1]
    assert final.metadata.state == pb.OperationMetadata.SUCCEEDED, final
    plan = response(final, pb.EditPlan)
    assert plan.spec == spec and 0 < len(plan.affected) <= 3
    assert all(a.alpha == -1.0 and a.concepts for a in plan.affected)
    assert {e.name for e in edits.ListEdits(pb.ListEditsRequest(), timeout=5).edits} == before


def test_list_edits_pages_newest_first(srv):
    edits = pb_grpc.EditsStub(srv.channel)
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["tree"], action=pb.EditOperation.SUPPRESS)])
    created = [edits.CreateEdit(pb.CreateEditRequest(spec=spec), timeout=5).name for _ in range(3)]
    seen, token = [], ""
    while True:
        page = edits.ListEdits(pb.ListEditsRequest(page_size=2, page_token=token), timeout=5)
        assert len(page.edits) <= 2 and all(not e.HasField("plan") for e in page.edits)
        seen += [e.name for e in page.edits]
        token = page.next_page_token
        if not token:
            break
    assert seen[:3] == created[::-1]
    for name in created:
        edits.DeleteEdit(pb.DeleteEditRequest(name=name), timeout=5)
    for token in ("x", "²", "0", "MTA", page.next_page_token + "A"):
        with pytest.raises(grpc.RpcError) as err:
            edits.ListEdits(pb.ListEditsRequest(page_token=token), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.value.details(), token


def test_cancelling_the_watch_stops_a_running_job(srv, tmp_path):
    import workers_plugin  # noqa: F401 - registers the slow "test.steps" job kind in this process

    from sith_workers.queue import JobQueue

    queue = JobQueue(srv.server.deps.redis, srv.prefix)
    job = queue.submit("test.steps", {"log": str(tmp_path / "log"), "key": "k", "steps": 200, "step_s": 0.05},
                       tenant="default")
    name = f"operations/{job.id}"
    with srv.worker():
        stream = pb_grpc.OperationsStub(srv.channel).WatchOperation(pb.WatchOperationRequest(name=name), timeout=60)
        for op in stream:
            if op.metadata.state == pb.OperationMetadata.RUNNING and op.metadata.progress > 0:
                break
        stream.cancel()
        final = wait_state(srv.channel, name, pb.OperationMetadata.CANCELLED)
    assert final.error.code == code_pb2.CANCELLED and final.metadata.progress < 1


def test_idle_worker_counted_before_its_first_job():
    """A worker that has not consumed anything yet is no group consumer, but it is alive and idle."""
    import uuid

    from server_support import shared_redis_url

    from sith_server.metrics import redis_stats
    from sith_workers.connection import connect
    from sith_workers.queue import JobQueue

    prefix = f"sithtest-{uuid.uuid4().hex[:10]}"
    client = connect(shared_redis_url())
    with worker_thread(prefix):
        deadline = time.monotonic() + 20
        while not JobQueue(client, prefix).workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = redis_stats(client, prefix)
    assert (stats["workers_idle"], stats["workers_busy"], stats["queued"]) == (1, 0, 0)


def test_create_edit_is_idempotent_per_request_id(srv):
    edits = pb_grpc.EditsStub(srv.channel)
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["tree"], action=pb.EditOperation.SUPPRESS)])
    key = f"retry-{time.monotonic_ns()}"
    # Duplicates racing the first create (a client retrying after a lost response) all get one edit.
    names: list[str] = []
    threads = [threading.Thread(target=lambda: names.append(
        edits.CreateEdit(pb.CreateEditRequest(spec=spec, request_id=key), timeout=10).name)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 4 and len(set(names)) == 1
    assert edits.CreateEdit(pb.CreateEditRequest(spec=spec, request_id=key), timeout=5).name == names[0]
    # No key: every call is a new edit.
    fresh = {edits.CreateEdit(pb.CreateEditRequest(spec=spec), timeout=5).name for _ in range(2)}
    assert len(fresh) == 2 and names[0] not in fresh
    other = pb.EditSpec(operations=[pb.EditOperation(concepts=["tree"], action=pb.EditOperation.AMPLIFY)])
    for request, field in ((pb.CreateEditRequest(spec=other, request_id=key), "request_id"),
                           (pb.CreateEditRequest(spec=spec, request_id="bad key!"), "request_id")):
        with pytest.raises(grpc.RpcError) as err:
            edits.CreateEdit(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    # A create rejected by validation does not consume the key: the corrected retry goes through.
    bad = pb.EditSpec(operations=[pb.EditOperation(concepts=["treee"], action=pb.EditOperation.SUPPRESS)])
    with pytest.raises(grpc.RpcError):
        edits.CreateEdit(pb.CreateEditRequest(spec=bad, request_id=key + "-2"), timeout=5)
    assert edits.CreateEdit(pb.CreateEditRequest(spec=spec, request_id=key + "-2"), timeout=5).name
    for name in {*names, *fresh}:
        edits.DeleteEdit(pb.DeleteEditRequest(name=name), timeout=5)
    # Deleting an edit releases its request_id: the same key makes a new edit at once.
    again = edits.CreateEdit(pb.CreateEditRequest(spec=other, request_id=key), timeout=5)
    assert again.name not in names and again.spec.operations[0].action == pb.EditOperation.AMPLIFY
    edits.DeleteEdit(pb.DeleteEditRequest(name=again.name), timeout=5)
