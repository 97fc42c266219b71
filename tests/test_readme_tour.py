"""The README's tour, end to end, asserting what a user sees.

* ``test_cli_tour``: the "same without a server" commands in order (in-process, the real loader,
  engine and exports), then the edited model reopened with `sith explain`, plain open_clip and
  `sith testbed evaluate`, and the in-process API's version of the same steps.
* ``test_service_tour``: `sith serve` with zero configuration (embedded Redis, one worker process,
  the shipped testbed model) and the SDK from the README and client/README.md: find, explain, edit
  with strength 0.5 (α = 0.5 in the downloaded manifest), download, reopen the download with
  `sith explain` and with plain open_clip, evaluate it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner

import sith
from sith.cli import main
from sith.edits.export import read_config, read_manifest, unpack_checkpoint
from sith.engine.models import load_reference

pytestmark = pytest.mark.slow
EVAL_SIZES = ["--n-factor", "200", "--n-spurious", "40", "--n-retrieval", "50"]  # the README runs 2000/1000/1000


def sith_cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"sith {' '.join(args)}:\n{result.output}"
    return result.stdout


def alphas(manifest: dict) -> list[float]:
    """α of every vector (or head, for per-head operators) the edit changed, as its manifest records it."""
    return [float(a["alpha"]) for a in manifest["affected"]]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_tour(workdir):
    out = sith_cli("explain")
    assert "testbed-main: heads explained" in out
    assert all(f"│ {layer} " in out or f"│     {layer} " in out for layer in (2, 3, 4, 5))

    out = sith_cli("explain", "-l", "-1", "--head", "2", "--fidelity")
    assert "layer 5 head 2" in out and "fidelity" in out and "theme:" in out

    hits = json.loads(sith_cli("find", "water", "sand", "--top", "10", "--json"))["hits"]
    assert len(hits) == 10 and hits[0]["matched"] in ("water", "sand")
    assert any(name in ("water", "sand") for name, _ in hits[0]["concepts"])

    sith_cli("decompose", "--out", "svd.safetensors")
    assert (workdir / "svd.safetensors").stat().st_size > 0

    preview = sith_cli("edit", "preview", "--concept", "red")
    assert "red" in preview

    out = sith_cli("edit", "apply", "--concept", "red", "--out", "red-free.safetensors")
    assert "wrote red-free.safetensors and red-free.edit.safetensors" in out
    manifest = read_manifest("red-free.safetensors")
    assert manifest["base_model"] == "testbed-main" and manifest["affected"]
    edited_hash = load_reference("red-free.safetensors").hash
    assert edited_hash != load_reference("testbed-main").hash

    delta = json.loads(sith_cli("adapt", "delta", "testbed-main", "red-free.safetensors", "--json"))
    assert delta["top_heads"] and delta["top_heads"][0]["relative"] > 0
    changed_heads = {(a["layer"], a["head"]) for a in manifest["affected"]}
    assert (delta["top_heads"][0]["layer"], delta["top_heads"][0]["head"]) in changed_heads

    match = json.loads(sith_cli("adapt", "match", "testbed-main", "testbed-small", "--json"))
    assert match["mean_score"] > match["null_mean_score"]

    out = sith_cli("testbed", "evaluate", "main", *EVAL_SIZES)
    assert "zero-shot colour" in out and (workdir / "testbed-main.eval.json").is_file()

    # the edited model reopens everywhere: sith explain, plain open_clip, sith testbed evaluate
    explained = json.loads(sith_cli("explain", "--model", "red-free.safetensors", "-l", "-1", "--head", "2", "--json"))
    assert explained["hash"] == edited_hash
    folder = unpack_checkpoint("red-free.safetensors", workdir / "red-free")
    plain = open_clip.create_model(f"local-dir:{folder}").eval()
    assert load_reference(str(folder)).hash == edited_hash
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        assert plain.encode_text(tokenizer(["a red square"])).shape[-1] == read_config(folder)["model_cfg"]["embed_dim"]
    sith_cli("testbed", "evaluate", "red-free.safetensors", *EVAL_SIZES)
    base_scores = json.loads((workdir / "testbed-main.eval.json").read_text())
    edited_scores = json.loads((workdir / "red-free.eval.json").read_text())
    assert edited_scores["hash"] == edited_hash
    # suppressing red costs colour recognition more than it costs shape recognition
    colour_drop = base_scores["zero_shot"]["colour"]["accuracy"] - edited_scores["zero_shot"]["colour"]["accuracy"]
    shape_drop = base_scores["zero_shot"]["shape"]["accuracy"] - edited_scores["zero_shot"]["shape"]["accuracy"]
    assert colour_drop > shape_drop

    # the in-process API walks the same path
    model = sith.load("testbed-main")
    assert model.find("red", top=3)[0].matched == "red"
    edited = model.edit(suppress=["red"], strength=0.5)
    assert set(edited.report.alphas) == {0.5}
    saved = edited.save(workdir / "red-half")
    assert set(alphas(read_manifest(saved))) == {0.5}
    assert sith.load(saved).hash == edited.hash


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_tour(workdir):
    sith_client = pytest.importorskip("sith_client")  # installed with ./client (README "Set up")
    from sith_client import errors

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITH_")}  # the zero-config default
    env.update(SITH_DATA_DIR=str(workdir / "server-data"), SITH_GRPC_ADDRESS=f"127.0.0.1:{port}",
               SITH_METRICS_PORT="0", SITH_DEVICE="cpu")
    sith = shutil.which("sith", path=str(Path(sys.executable).parent)) or "sith"
    server = subprocess.Popen([sith, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with sith_client.Client(f"grpc://127.0.0.1:{port}", timeout=120) as c:
            deadline = time.monotonic() + 180
            while True:  # the service comes up with its embedded Redis and worker
                assert server.poll() is None, server.stderr.read().decode(errors="replace")
                try:
                    hits = c.find(["red"], top=5).hits  # README: which vectors write "red"
                    break
                except (errors.Unavailable, errors.DeadlineExceeded):
                    assert time.monotonic() < deadline, "sith serve never answered"
                    time.sleep(1)
            assert len(hits) == 5 and hits[0].matched == "red"
            assert "red" in [concept.name for concept in hits[0].concepts]  # the vector's explanation names it
            heads = c.explain(layers=[-1], k=5).heads  # client README
            assert heads and all(h.layer == 5 for h in heads)

            edit = c.wait(c.edit(suppress=["red"], strength=0.5), timeout=600)
            assert edit.ready
            if edit.plan is not None:  # GetEdit carries the plan: what the user is shown before downloading
                assert edit.plan.affected and all(abs(a.alpha - 0.5) < 1e-9 for a in edit.plan.affected)
            path = c.download(edit, workdir / "red-free.safetensors")

        manifest = read_manifest(path)  # what the user downloaded
        assert alphas(manifest) and set(alphas(manifest)) == {0.5}  # strength 0.5 gives α = 0.5
        assert manifest["spec"]["operations"][0]["strength"] == 0.5
        # reopen: `sith explain` takes the file as it is; plain open_clip takes its folder form
        local_hash = load_reference(str(path)).hash
        explained = json.loads(sith_cli("explain", "--model", str(path), "-l", "-1", "--head", "0", "--json"))
        assert explained["hash"] == local_hash != load_reference("testbed-main").hash
        folder = unpack_checkpoint(path, workdir / "red-free")
        plain = open_clip.create_model(f"local-dir:{folder}").eval()
        reopened = load_reference(str(folder))
        assert reopened.hash == local_hash
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(plain.encode_image(x), reopened.model.encode_image(x), atol=1e-5)
        out = sith_cli("testbed", "evaluate", str(path), *EVAL_SIZES)
        assert "zero-shot colour" in out and json.loads((workdir / "red-free.eval.json").read_text())["hash"] == local_hash
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
