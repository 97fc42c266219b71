"""Job handlers on the real engine (a tiny CLIP) through in-process workers and the real Redis."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from edits_fixtures import CONCEPTS, TINY_CFG, tiny_clip
from sith.edits.multipliers import Multipliers
from sith.engine.decomposition import decompose
from sith.engine.models import TESTBED_DIR, load_model
from sith_workers.editstore import EditStore
from sith_workers.queue import JobQueue
from sith_workers.worker import Worker, WorkerSettings
from workers_fixtures import prefix, shared, wait_done  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_file({k: v.contiguous() for k, v in tiny_clip(0).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return str(folder)


def _run(client, prefix: str, jobs: list[tuple[str, dict]], tenant: str = "acme"):
    """A fresh worker (empty per-process pools) runs ``jobs``; returns (records, worker)."""
    queue = JobQueue(client, prefix)
    worker = Worker(WorkerSettings(redis_url="unused", prefix=prefix), client=client,
                    consumer=f"w-{time.monotonic_ns()}")
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
    heads = first.result["heads"]
    assert [h["head"] for h in heads] == list(range(TINY_CFG["vision_cfg"]["width"] // 16))
    assert all(h["layer"] == 2 and h["vectors"][0]["concepts"] for h in heads)
    assert cold.cache.misses > 0
    [second], warm = _run(shared, prefix, [("explain", payload)])     # new process state, same Redis
    assert second.result == first.result
    assert warm.cache.misses == 0 and warm.cache.hits >= 3      # dictionary, SVD, codes (+ image mean)


def test_decompose_matches_the_engine_and_hash_references_resolve(shared, prefix, model_dir):
    [by_path], _ = _run(shared, prefix, [("decompose", {"model": model_dir, "layers": [0, 2],
                                                        "dictionary": CONCEPTS})])
    assert by_path.state == "succeeded", by_path.error
    model_hash = by_path.result["model"]["hash"]
    expected = decompose(load_model(model_dir), [0, 2])
    for entry in by_path.result["layers"]:
        assert torch.allclose(torch.tensor(entry["singular_values"]), expected[entry["layer"]].S, atol=1e-5)
    [by_hash], _ = _run(shared, prefix, [("decompose", {"model": model_hash, "layers": [0],
                                                        "dictionary": CONCEPTS})])
    assert by_hash.state == "succeeded" and by_hash.result["layers"][0] == by_path.result["layers"][0]


def test_find_and_bad_input(shared, prefix, model_dir):
    base = {"model": model_dir, "dictionary": CONCEPTS, "layers": [-1]}
    (hits, bad_concept, bad_layer, bad_hash), _ = _run(shared, prefix, [
        ("find", {**base, "concepts": ["water"], "top": 4}),
        ("find", {**base, "concepts": ["watr"]}),
        ("explain", {**base, "layers": [7]}),
        ("explain", {**base, "model": "0" * 64}),
    ])
    assert hits.state == "succeeded" and len(hits.result["hits"]) == 4
    assert bad_concept.state == "failed" and bad_concept.error["code"] == "invalid_argument"
    assert "water" in bad_concept.error.get("suggestions", [])
    assert bad_layer.error["code"] == "invalid_argument" and bad_layer.error["field"].startswith("layers")
    assert bad_hash.error["code"] == "not_found"


def test_edit_is_stored_persistently_and_reruns_are_idempotent(shared, prefix, model_dir):
    spec = {"model": model_dir, "operations": [{"concepts": ["water"], "action": "suppress",
                                                 "layers": [-1], "select": {"rule": "top_n", "n": 2}}]}
    payload = {"spec": spec, "dictionary": CONCEPTS}
    [preview, job], worker = _run(shared, prefix, [("edit", {**payload, "dry_run": True}), ("edit", payload)],
                                  tenant="acme")
    assert preview.state == "succeeded" and job.state == "succeeded", (preview.error, job.error)
    store = EditStore(shared, prefix)
    assert preview.result["plan"] == job.result["plan"]
    edit_id = job.result["edit_id"]
    record = store.get("acme", edit_id)
    assert record is not None and store.get("other-tenant", edit_id) is None
    assert shared.ttl(store.key("acme", edit_id)) == -1                   # no TTL: never evicted
    multipliers = Multipliers.from_bytes(record.multipliers)
    assert len(multipliers.changed()) == 2 and record.manifest["spec"]["model"] == model_dir
    # at-least-once: the same job delivered again rewrites the same record, nothing more
    queue = JobQueue(shared, prefix)
    shared.hset(queue.record_key(job.id), "state", "queued")
    shared.xadd(queue.stream, {"job": job.id})
    worker2 = Worker(WorkerSettings(redis_url="unused", prefix=prefix), client=shared, consumer="w-rerun")
    worker2.run(max_jobs=1)
    assert queue.get(job.id).state == "succeeded" and queue.get(job.id).attempts == 2
    assert store.list("acme") == [edit_id]                             # the dry run stored nothing
    assert Multipliers.from_bytes(store.get("acme", edit_id).multipliers) == multipliers


@pytest.mark.skipif(not (TESTBED_DIR / "open_clip_model.safetensors").is_file(),
                    reason="the embedded testbed model is not installed")
def test_default_model_reference_runs_the_embedded_testbed(shared, prefix):
    [job], _ = _run(shared, prefix, [("explain", {"model": "default", "layers": [-1], "heads": [0],
                                                  "dictionary": CONCEPTS})])
    assert job.state == "succeeded", job.error
    assert job.result["model"]["hash"] == load_model().hash and len(job.result["heads"]) == 1
