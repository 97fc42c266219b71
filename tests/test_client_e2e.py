"""The SDK against a real server on localhost, a real worker and real Redis (db 7).

Covers the issue's end-to-end promises: edit → download → reload in plain open_clip with the same
embeddings the server computes; INVALID_ARGUMENT details as typed exceptions; retries on
UNAVAILABLE while a server comes up; auth, TLS, asyncio, jobs and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors import safe_open
from server_support import TINY_CFG, WORDS, running_server, tiny_model_folder

import sith_client
from sith_client.cli import main as cli_main
from sith_server.app import build
from sith_server.config import ServerConfig
from sith_server.vocabulary import Vocabulary
from sith_workers.connection import connect

pytestmark = pytest.mark.slow
REDIS_URL = "redis://127.0.0.1:6379/7"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-a")


@pytest.fixture(scope="module")
def srv(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    with running_server([str(model_dir)], data_dir=tmp_path_factory.mktemp("data"), redis_url=REDIS_URL) as running:
        with running.worker():
            yield running


@pytest.fixture()
def client(srv: object) -> Iterator[sith_client.Client]:
    with sith_client.Client(srv.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def ready_edit(srv: object) -> sith_client.Edit:
    with sith_client.Client(srv.address) as c:
        return c.wait(c.edit(suppress=["red"], top_n=3, operator="sith_scale"), timeout=120)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_open_clip(model_dir: Path, checkpoint: Path, folder: Path) -> torch.nn.Module:
    """What a user does with the download: an open_clip local-dir folder, no sith code."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir / "open_clip_config.json", folder / "open_clip_config.json")
    shutil.copy(checkpoint, folder / "open_clip_model.safetensors")
    return open_clip.create_model(f"local-dir:{folder}").eval()


# --- the main promise ------------------------------------------------------------------------------


def test_edit_download_reload_in_open_clip_matches_server(client: sith_client.Client, model_dir: Path,
                                                          tmp_path: Path) -> None:
    edit = client.edit(suppress=["red"], top_n=3, strength=0.5, operator="sith_scale")
    assert edit.state == "pending" and edit.name.startswith("tenants/default/edits/")
    edit = client.wait(edit, timeout=120)
    path = client.download(edit, tmp_path / "red-free.safetensors")
    assert edit.ready and edit.plan.affected
    assert all(v.alpha == 0.5 for v in edit.plan.affected)         # strength honoured for suppress
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()          # an ordinary file, like the sidecars
    assert path == tmp_path / "red-free.safetensors" and not list(tmp_path.glob(".*.part"))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()  # the edit manifest travels inside the checkpoint

    model = plain_open_clip(model_dir, path, tmp_path / "edited")
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        local = model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    served = client.embed_images(pixels, edit=edit)
    assert served.vectors.shape == (4, TINY_CFG["embed_dim"]) and served.vectors.dtype == np.float32
    np.testing.assert_allclose(served.vectors, local, atol=1e-5)

    base = client.embed_images(pixels)
    assert np.abs(base.vectors - local).max() > 1e-4           # the edit changed the vision tower
    with pytest.raises(sith_client.InvalidArgument) as info:     # ...and only the vision tower
        client.embed_texts(["a red dog"], edit=edit)
    assert info.value.field == "edit"


def test_download_into_directory_and_reject_unknown_edit(client: sith_client.Client,
                                                         ready_edit: sith_client.Edit, tmp_path: Path) -> None:
    path = client.download(ready_edit.name, tmp_path)
    assert path.parent == tmp_path and path.suffix == ".safetensors" and path.stat().st_size > 0
    with pytest.raises(sith_client.NotFound):
        client.download("tenants/default/edits/" + "0" * 32, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --- typed errors ----------------------------------------------------------------------------------


def test_unknown_concept_is_invalid_argument_with_suggestions(client: sith_client.Client) -> None:
    with pytest.raises(sith_client.InvalidArgument) as info:
        client.find(["rde"])
    err = info.value
    assert err.field == "concepts[0]" and "red" in err.suggestions
    assert err.field_violations[0].suggestions[:len(err.suggestions)] and "did you mean" in str(err)

    with pytest.raises(sith_client.InvalidArgument) as info2:
        client.edit(suppress=["blu"])
    assert info2.value.field == "spec.operations[0].concepts[0]" and "blue" in info2.value.suggestions


def test_other_bad_inputs_are_typed(client: sith_client.Client) -> None:
    with pytest.raises(sith_client.InvalidArgument) as info:
        client.explain(layers=[7])
    assert info.value.field and info.value.field.startswith("layers")
    with pytest.raises(sith_client.NotFound) as nf:
        client.model("tiny-b")
    assert nf.value.resource_type == "model" and nf.value.resource == "tiny-b" and "tiny-a" in nf.value.suggestions
    with pytest.raises(sith_client.NotFound) as nf:
        client.get_edit("tenants/default/edits/" + "f" * 32)
    assert nf.value.resource == "tenants/default/edits/" + "f" * 32
    with pytest.raises(sith_client.InvalidArgument) as info:
        client.edit(suppress=["red"], strength=-1)                  # suppress needs 0 <= strength < 1
    assert info.value.field == "spec.operations[0].strength"
    with pytest.raises(sith_client.InvalidArgument) as info:
        client.embed_images(b"\x89PNG not really")
    assert "object at 0x" not in str(info.value)
    with pytest.raises(sith_client.InvalidArgument):
        client.embed_images(np.zeros((3, 8, 8), np.float32))   # wrong image size


# --- results and jobs ------------------------------------------------------------------------------


def test_models_explain_find_decompose_are_typed(client: sith_client.Client, srv: object) -> None:
    (m,) = client.models()
    assert isinstance(m, sith_client.Model) and m.is_default and (m.layers, m.heads) == (3, 4)
    assert client.model(m.hash[:12]) == m
    heads = client.explain(layers=[-1], heads=[0, 1], k=3).heads
    assert [(h.layer, h.head) for h in heads] == [(2, 0), (2, 1)]
    vec = heads[0].vectors[0]
    assert isinstance(vec.index, int) and vec.sigma > 0 and 1 <= len(vec.concepts) <= 3
    assert all(c.name in WORDS for c in vec.concepts)
    hits = client.find("red", top=3).hits
    assert len(hits) == 3 and hits[0].score >= hits[-1].score and hits[0].matched == "red"
    (spectrum,) = client.decompose(layers=[-1]).layers
    assert spectrum.layer == 2 and sith_client.tensor_to_numpy(spectrum.singular_values).shape[0] == 4


def test_job_handle_wait_and_result(client: sith_client.Client) -> None:
    job = client.explain(layers=[0], heads=[1], k=2, wait=False)
    assert isinstance(job, sith_client.Job) and job.name.startswith("operations/")
    updates: list[float] = []
    result = client.result(job, timeout=120, progress=lambda j: updates.append(j.progress))
    assert result.heads[0].head == 1 and updates[-1] == 1.0
    again = client.job(job.name)                      # re-attached: the result's type comes with it
    assert again.done and again.state == "succeeded" and again.result() == result


def test_preview_and_edit_listing(client: sith_client.Client, ready_edit: sith_client.Edit) -> None:
    preview = client.preview_edit(suppress="red", top_n=2, operator="sith_scale", timeout=120)
    assert isinstance(preview, sith_client.EditPlan) and len(preview.affected) == 2 and preview.heads
    assert all(h.energy_ratio <= 1.0 for h in preview.heads)
    names = [e.name for e in client.edits(page_size=1)]
    assert ready_edit.name in names
    assert client.get_edit(ready_edit.id).spec.operations[0].concepts == ["red"]


def test_delete_edit(client: sith_client.Client) -> None:
    edit = client.wait(client.edit(flip=["green"], top_n=1, operator="sith_scale"), timeout=120)
    client.delete_edit(edit)
    with pytest.raises(sith_client.NotFound):
        client.refresh(edit)


# --- no worker: waiting, timeouts, cancel ----------------------------------------------------------


@pytest.fixture(scope="module")
def idle_srv(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A server whose queue nobody consumes, so jobs stay queued deterministically."""
    with running_server([str(model_dir)], data_dir=tmp_path_factory.mktemp("idle"), redis_url=REDIS_URL) as running:
        yield running


def test_wait_timeout_then_cancel(idle_srv: object) -> None:
    with sith_client.Client(idle_srv.address) as c:
        job = c.explain(layers=[-1], wait=False)
        assert job.state == "queued"
        start = time.monotonic()
        with pytest.raises(sith_client.DeadlineExceeded):
            c.wait(job, timeout=0.5)
        assert time.monotonic() - start < 5
        job = c.cancel(job)
        assert job.state == "cancelled" and job.done
        with pytest.raises(sith_client.JobFailed) as info:
            job.result()
        assert isinstance(info.value, sith_client.errors.Cancelled)


def test_edit_whose_planning_was_cancelled_fails_loudly(idle_srv: object) -> None:
    with sith_client.Client(idle_srv.address) as c:
        edit = c.edit(suppress=["red"], request_id="cancel-me")
        assert c.edit(suppress=["red"], request_id="cancel-me").name == edit.name  # a repeat is the same edit
        assert c.edit(suppress=["red"]).name != edit.name
        c.cancel(c.job(edit.operation))
        with pytest.raises(sith_client.JobFailed) as info:
            c.wait(edit, timeout=10)
        assert c.get_edit(edit).state == "failed" and isinstance(info.value, sith_client.errors.Cancelled)
        c.delete_edit(edit)                                   # deleting frees its request_id at once
        assert c.edit(suppress=["red"], request_id="cancel-me").name != edit.name


def test_async_job_timeout_and_cancel(idle_srv: object) -> None:
    async def go() -> str:
        async with sith_client.AsyncClient(idle_srv.address) as c:
            job = await c.find("red", wait=False)
            with pytest.raises(sith_client.DeadlineExceeded):
                await c.wait(job, timeout=0.3)
            job = await c.cancel(job)
            with pytest.raises(sith_client.JobFailed):
                await c.result(job)
            return job.state

    assert asyncio.run(asyncio.wait_for(go(), 30)) == "cancelled"


# --- retries, auth, TLS ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(model_dir: Path, data_dir: Path, **config: object) -> Iterator[object]:
    prefix = f"sithclient-{uuid.uuid4().hex[:10]}"
    settings = {"grpc_address": "127.0.0.1:0", "auth_disabled": True, "redis_url": REDIS_URL, **config}
    cfg = ServerConfig(metrics_port=0, models=(str(model_dir),), data_dir=data_dir, **settings)  # type: ignore[arg-type]
    server = build(cfg, prefix=prefix, vocabulary=Vocabulary(WORDS)).start()
    try:
        yield server
    finally:
        server.stop(grace=1)
        r = connect(REDIS_URL)
        for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            r.delete(key)


def test_retries_until_a_starting_server_answers(model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    policy = sith_client.RetryPolicy(max_attempts=30, initial_backoff=0.1, max_backoff=1.0, jitter=False)
    started = threading.Event()
    stop = threading.Event()

    def late_server() -> None:
        time.sleep(0.5)
        with _server(model_dir, tmp_path, grpc_address=f"127.0.0.1:{port}"):
            started.set()
            stop.wait(30)

    thread = threading.Thread(target=late_server, daemon=True)
    thread.start()
    try:
        with sith_client.Client(f"127.0.0.1:{port}", retry=policy) as c:
            assert not started.is_set()
            assert c.models()[0].name == "tiny-a"          # UNAVAILABLE at first, then retried
        assert started.is_set()
    finally:
        stop.set()
        thread.join(10)


def test_server_side_unavailable_honours_retry_info(model_dir: Path, tmp_path: Path) -> None:
    """Redis down behind a live server: UNAVAILABLE + RetryInfo(1 s); the SDK waits as asked (capped)."""
    dead_redis = f"redis://127.0.0.1:{_free_port()}/0"
    policy = sith_client.RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.4)
    with _server(model_dir, tmp_path, redis_url=dead_redis) as server:
        with sith_client.Client(f"127.0.0.1:{server.port}", retry=policy) as c:
            assert c.models()                                  # served from memory: fine
            start = time.monotonic()
            with pytest.raises(sith_client.Unavailable) as info:
                c.explain(layers=[-1])
            elapsed = time.monotonic() - start
    assert info.value.attempts == 2 and info.value.retry_after == 1.0
    assert 0.4 <= elapsed < 10


def test_token_from_argument_or_env(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-alice alice\n")
    with _server(model_dir, tmp_path, auth_disabled=False, auth_tokens_file=tokens) as server:
        address = f"127.0.0.1:{server.port}"
        monkeypatch.delenv("SITH_TOKEN", raising=False)
        with sith_client.Client(address) as c, pytest.raises(sith_client.Unauthenticated):
            c.models()
        with sith_client.Client(address, token="wrong") as c, pytest.raises(sith_client.Unauthenticated):
            c.models()
        with sith_client.Client(address, token="tok-alice") as c:
            assert c.models()
        monkeypatch.setenv("SITH_TOKEN", "tok-alice")
        with sith_client.Client(address) as c:
            assert c.embed_texts("dog").shape == (1, TINY_CFG["embed_dim"])


def test_tls_with_root_certificates(model_dir: Path, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=sith.test",
                    "-addext", "subjectAltName=DNS:sith.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with _server(model_dir, tmp_path, tls_cert=cert, tls_key=key) as server:
        address = f"127.0.0.1:{server.port}"
        with sith_client.Client(address, root_certificates=cert, server_name="sith.test") as c:
            assert c.connection.tls and c.models()[0].name == "tiny-a"
        with sith_client.Client(address, retry=None) as plain, pytest.raises(sith_client.Unavailable):
            plain.models()                                    # plaintext against a TLS port


# --- asyncio ---------------------------------------------------------------------------------------


def test_async_client_end_to_end(srv: object, tmp_path: Path) -> None:
    async def go() -> None:
        async with sith_client.AsyncClient(srv.address) as c:
            embs = await asyncio.gather(*(c.embed_texts([w]) for w in WORDS[:8]))
            assert all(e.shape == (1, TINY_CFG["embed_dim"]) for e in embs)
            heads = (await c.explain(layers=[-1], heads=[3], k=2)).heads
            assert heads[0].head == 3
            with pytest.raises(sith_client.InvalidArgument) as info:
                await c.find(["rde"])
            assert "red" in info.value.suggestions
            edit = await c.edit(amplify=["blue"], strength=1.5, top_n=2, operator="sith_scale")
            edit = await c.wait(edit, timeout=120)
            assert all(v.alpha == 1.5 for v in edit.plan.affected)
            path = await c.download(edit, tmp_path / "async.safetensors")
            assert path.stat().st_size > 0
            assert [e.name async for e in c.edits()]

    asyncio.run(asyncio.wait_for(go(), 240))


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_edit_download_and_errors(srv: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.safetensors"
    base = ["--address", srv.address]
    assert cli_main([*base, "edit", "--suppress", "red", "--top-n", "2", "--strength", "0.5", "--operator",
                     "sith_scale", "--download", str(out)]) == 0
    assert out.stat().st_size > 0
    capsys.readouterr()
    assert cli_main([*base, "--json", "models"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "tiny-a"
    assert cli_main([*base, "--json", "find", "red", "--top", "1"]) == 0
    (hit,) = json.loads(capsys.readouterr().out)["hits"]
    assert {"layer", "head", "index", "score"} <= set(hit) and set(hit["concepts"][0]) == {"name", "score"}
    npy = tmp_path / "emb.npy"
    assert cli_main([*base, "embed-text", "a red dog", "sky", "--out", str(npy)]) == 0
    assert np.load(npy).shape == (2, TINY_CFG["embed_dim"])
    assert cli_main([*base, "find", "rde"]) == 2
    assert "did you mean: red" in capsys.readouterr().err


def test_a_batch_of_32_encoded_images_fits_one_request(client: sith_client.Client) -> None:
    """32 noisy 256 px PNGs are ~6 MiB: over gRPC's 4 MB default, within the API's 32 MiB."""
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    images = []
    for _ in range(32):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    assert sum(map(len, images)) > 4 * 2**20
    emb = client.embed_images(images)
    assert emb.shape == (32, TINY_CFG["embed_dim"])
