"""Job handlers on the real engine (a tiny CLIP) through in-process workers and the real Redis."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edits_fixtures import CONCEPTS, TINY_CFG, tiny_clip
from google.protobuf import any_pb2, json_format
from google.rpc import code_pb2

from sith.edits.export import read_manifest
from sith.edits.multipliers import Multipliers
from sith.engine.decomposition import decompose
from sith.engine.models import TESTBED_DIR, load_model
from sith_api.v1 import sith_pb2 as pb
from sith_workers.edits import EditStore
from sith_workers.errors import job_status
from sith_workers.queue import JobQueue
from sith_workers.worker import Worker, WorkerSettings
from workers_fixtures import wait_done

pytestmark = pytest.mark.slow


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_file({k: v.contiguous() for k, v in tiny_clip(0).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return str(folder)


def typed(record, kind):
    """A job's stored result as the message it must be (the Any's canonical JSON form in Redis)."""
    packed = json_format.ParseDict(record.result, any_pb2.Any())
    message = kind()
    assert packed.Unpack(message), packed.type_url
    return message


def _run(client, prefix: str, jobs: list[tuple[str, dict]], tenant: str = "acme", data_dir=None):
    """A fresh worker (empty per-process pools) runs ``jobs``; returns (records, worker)."""
    queue = JobQueue(client, prefix)
    settings = WorkerSettings(redis_url="unused", prefix=prefix, **({"data_dir": data_dir} if data_dir else {}))
    worker = Worker(settings, client=client, consumer=f"w-{time.monotonic_ns()}")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        ids = [queue.submit(kind, payload, tenant=tenant).id for kind, payload in jobs]
        records = [wait_done(queue, i, 120) for i in ids]
    finally:
        worker.stop()
        thread.join(20)
    return records, worker


def test_explain_then_cache_hit_path(shared, prefix, model_dir):
    payload = {"model": model_dir, "layers": [-1], "dictionary": CONCEPTS, "k": 3}
    [first], cold = _run(shared, prefix, [("explain", payload)])
    assert first.state == "succeeded", first.error
    heads = typed(first, pb.ExplainHeadsResponse).heads
    assert [h.head for h in heads] == list(range(TINY_CFG["vision_cfg"]["width"] // 16))
    assert all(h.layer == 2 and h.vectors[0].concepts for h in heads)
    assert all(isinstance(v.index, int) and 1 <= len(v.concepts) <= 3 for h in heads for v in h.vectors)
    assert cold.cache.misses > 0
    [second], warm = _run(shared, prefix, [("explain", payload)])     # new process state, same Redis
    assert second.result == first.result
    assert warm.cache.misses == 0 and warm.cache.hits >= 3      # dictionary, SVD, codes (+ image mean)


def test_decompose_matches_the_engine_and_hash_references_resolve(shared, prefix, model_dir):
    [by_path], _ = _run(shared, prefix, [("decompose", {"model": model_dir, "layers": [0, 2],
                                                        "dictionary": CONCEPTS})])
    assert by_path.state == "succeeded", by_path.error
    result = typed(by_path, pb.DecomposeResponse)
    expected = decompose(load_model(model_dir), [0, 2])
    for entry in result.layers:
        values = np.frombuffer(entry.singular_values.data, dtype="<f4").reshape(tuple(entry.singular_values.shape))
        assert torch.allclose(torch.from_numpy(values.copy()), expected[entry.layer].S, atol=1e-5)
    [by_hash], _ = _run(shared, prefix, [("decompose", {"model": result.model.hash, "layers": [0],
                                                        "dictionary": CONCEPTS})])
    assert by_hash.state == "succeeded" and typed(by_hash, pb.DecomposeResponse).layers[0] == result.layers[0]


def test_find_and_bad_input(shared, prefix, model_dir):
    base = {"model": model_dir, "dictionary": CONCEPTS, "layers": [-1]}
    (hits, bad_concept, bad_layer, bad_hash), _ = _run(shared, prefix, [
        ("find", {**base, "concepts": ["water"], "top": 4}),
        ("find", {**base, "concepts": ["watr"]}),
        ("explain", {**base, "layers": [7]}),
        ("explain", {**base, "model": "0" * 64}),
    ])
    assert hits.state == "succeeded" and len(typed(hits, pb.FindConceptResponse).hits) == 4
    assert bad_concept.state == "failed" and bad_concept.error["code"] == "invalid_argument"
    assert "water" in bad_concept.error.get("suggestions", [])
    status = job_status(bad_concept.error, "failed")                 # what clients get: data, not prose
    assert status.code == code_pb2.INVALID_ARGUMENT
    suggestions = [d for d in status.details if d.Is(pb.Suggestions.DESCRIPTOR)]
    assert len(suggestions) == 1
    assert bad_layer.error["code"] == "invalid_argument" and bad_layer.error["field"].startswith("layers")
    assert bad_hash.error["code"] == "not_found"


def test_edit_is_planned_exported_and_stored_and_reruns_are_idempotent(shared, prefix, model_dir, tmp_path):
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["water"], action=pb.EditOperation.SUPPRESS,
                                                    layers=[-1], select=pb.Selection(rule=pb.Selection.TOP_N, n=2),
                                                    operator="sith_scale")])
    store = EditStore(shared, prefix)
    edit_id = store.new_id()
    store.create("acme", edit_id, spec, "unused-hash")
    store.attach_job("acme", edit_id, "0" * 32)                          # listed (the server does this)
    payload = {"model": model_dir, "dictionary": CONCEPTS}
    [preview, job], worker = _run(shared, prefix, [
        ("edit", {**payload, "spec": json_format.MessageToDict(spec), "dry_run": True}),
        ("edit", {**payload, "edit_id": edit_id})], tenant="acme", data_dir=tmp_path)
    assert preview.state == "succeeded" and job.state == "succeeded", (preview.error, job.error)
    plan = typed(preview, pb.EditPlan)
    assert plan.spec == spec and len(plan.affected) == 2
    assert all(a.alpha == 0.0 and a.operator == "sith_scale" for a in plan.affected)
    planned = plan.planned.operations[0]                                   # the request, defaults filled in
    assert (planned.operator, planned.select.rule, planned.select.n, list(planned.layers)) == \
        ("sith_scale", pb.Selection.TOP_N, 2, [-1])
    assert not planned.HasField("target") and planned.preserve_neighbours
    done = typed(job, pb.Edit)
    assert done.state == pb.Edit.READY and not done.HasField("plan")       # GetEdit has the plan
    record = store.get("acme", edit_id)
    assert record.state == "ready" and record.edit.plan == plan and record.edit.spec == spec
    assert store.get("other-tenant", edit_id) is None
    assert shared.ttl(store.key("acme", edit_id)) == -1                   # no TTL: never evicted
    multipliers = Multipliers.from_bytes(record.multipliers)
    assert len(multipliers.changed()) == 2
    # the artifact: written once, where the record says, with the digest it announces
    path = tmp_path / "edits" / "acme" / f"{edit_id}.safetensors"
    assert record.path == str(path) and path.stat().st_size == record.edit.artifact.size_bytes
    assert read_manifest(path)["edit_id"] == edit_id
    first_bytes = path.read_bytes()
    # at-least-once: the same job delivered again rewrites the same record and file, nothing more
    queue = JobQueue(shared, prefix)
    shared.hset(queue.record_key(job.id), "state", "queued")
    shared.xadd(queue.stream, {"job": job.id})
    worker2 = Worker(WorkerSettings(redis_url="unused", prefix=prefix, data_dir=tmp_path), client=shared,
                     consumer="w-rerun")
    worker2.run(max_jobs=1)
    assert queue.get(job.id).state == "succeeded" and queue.get(job.id).attempts == 2
    edits, more = store.list("acme", 0, 10)
    assert [e.id for e in edits] == [edit_id] and not more            # the dry run stored nothing
    assert Multipliers.from_bytes(store.get("acme", edit_id).multipliers) == multipliers
    # the re-run replaced the file atomically (no temp left) and the record describes what is on disk.
    # Its bytes may differ from the first run's in the last float digits (cached vs fresh SVDs, so a
    # float's repr, and with it the header's length, can change): compare what the file says instead.
    rerun = store.get("acme", edit_id)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert rerun.edit.artifact.size_bytes == path.stat().st_size
    assert rerun.edit.artifact.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    first_copy = tmp_path / "first.safetensors"
    first_copy.write_bytes(first_bytes)
    assert _same_document(read_manifest(path), read_manifest(first_copy))
    assert abs(len(first_bytes) - path.stat().st_size) <= 64                 # header text only


def test_a_failed_edit_job_fails_its_edit_in_the_same_step(shared, prefix, model_dir, tmp_path):
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["watr"], action=pb.EditOperation.SUPPRESS)])
    store = EditStore(shared, prefix)
    edit_id = store.new_id()
    store.create("acme", edit_id, spec, "unused-hash")
    [job], _ = _run(shared, prefix, [("edit", {"model": model_dir, "dictionary": CONCEPTS, "edit_id": edit_id})],
                    data_dir=tmp_path)
    assert job.state == "failed" and job.error["code"] == "invalid_argument"
    record = store.get("acme", edit_id)
    assert record.state == "failed" and record.edit.error == job_status(job.error, "failed")
    assert not (tmp_path / "edits").exists()


def test_the_quota_counts_the_edit_stores_index(shared, prefix):
    """The queue's stored-edits quota reads the one edit store's index (one key, not a copy)."""
    assert JobQueue(shared, prefix).edits_index_key("acme") == EditStore(shared, prefix).index_key("acme")


@pytest.mark.skipif(not (TESTBED_DIR / "open_clip_model.safetensors").is_file(),
                    reason="the embedded testbed model is not installed")
def test_default_model_reference_runs_the_embedded_testbed(shared, prefix):
    [job], _ = _run(shared, prefix, [("explain", {"model": "default", "layers": [-1], "heads": [0],
                                                  "dictionary": CONCEPTS})])
    assert job.state == "succeeded", job.error
    result = typed(job, pb.ExplainHeadsResponse)
    assert result.model.hash == load_model().hash and len(result.heads) == 1


def _same_document(a, b, rel: float = 1e-5) -> bool:
    """Equal JSON documents, floats equal to ``rel`` (the last digits of a re-computed value may differ)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_document(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same_document(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    return a == b
