"""The in-process API (`sith.load(...)`): explain, find, explain_image, edit, save; results as tables
(text and HTML) and pandas DataFrames; `import sith` stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import sith
from sith.engine.errors import InvalidInput


def test_import_sith_is_light_and_exports_the_api_lazily():
    code = ("import sys, sith\nprint(sorted(m for m in ('torch', 'open_clip', 'sith.api') if m in sys.modules))\n"
            "sith.load\nprint('sith.api' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["[]", "True"]
    with pytest.raises(AttributeError):
        sith.no_such_name  # noqa: B018
    assert "load" in dir(sith)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SITH_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        yield sith.load("testbed-main")


@pytest.mark.slow
def test_find_and_explain_render_as_tables_and_frames(model):
    assert "testbed-main" in repr(model) and "6 layers" in repr(model)
    hits = model.find("red", top=5)
    assert len(hits) == 5 and hits[0].matched == "red"
    text = repr(hits)
    assert "relevance" in text and "red" in text and len(text.splitlines()) >= 5
    html = hits._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == 6  # header + 5 rows
    frame = hits.to_pandas()
    assert list(frame.columns) == list(hits.columns) and len(frame) == 5
    assert frame["relevance"].is_monotonic_decreasing
    explained = model.explain(layers=[-1], heads=[0, 1], vectors=2)
    frame = explained.to_pandas()
    assert len(explained) == 2 and len(frame) == 4 and set(frame["layer"]) == {5}
    assert frame["concepts"].str.len().min() > 0
    with pytest.raises(InvalidInput) as err:
        model.find("rde")
    assert err.value.field == "concepts[0]" and err.value.suggestions


@pytest.mark.slow
def test_edit_returns_a_ready_open_clip_model_and_saves_it(model, tmp_path):
    edited = model.edit(suppress=["red"], strength=0.5)
    assert isinstance(edited, sith.EditedModel) and isinstance(edited.model, open_clip.model.CLIP)
    assert not edited.model.training and edited.hash != model.hash
    assert edited.report.alphas and set(edited.report.alphas) == {0.5}  # strength means α
    assert edited.manifest["spec"]["operations"][0]["strength"] == 0.5
    assert len(edited.report.to_pandas()) == len(edited.report)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        changed = (edited.model.encode_image(x) - model.model.encode_image(x)).abs().max()
    assert changed > 1e-4
    folder = edited.save(tmp_path / "red-half")
    plain = open_clip.create_model(f"local-dir:{folder}").eval()
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(x), edited.model.encode_image(x), atol=1e-5)
    assert (folder / "sith_multipliers.edit.safetensors").is_file()
    again = sith.load(folder)
    assert again.hash == edited.hash
    single = edited.save(tmp_path / "red-half.safetensors")
    assert sith.load(single).hash == edited.hash and (tmp_path / "red-half.edit.safetensors").is_file()
    scores = edited.evaluate(n_factor=40, n_spurious=8, n_retrieval=10)
    assert scores["hash"] == edited.hash and 0 <= scores["zero_shot"]["colour"]["accuracy"] <= 1


@pytest.mark.slow
def test_explain_image_and_preview(model, tmp_path):
    from sith.testbed.world import NATURAL, sample

    drawn = sample(NATURAL, 4242, 1)
    path = tmp_path / "red-squares.png"
    Image.fromarray((drawn.image * 255 + 0.5).astype(np.uint8)).save(path)
    explained = model.explain_image(path, top=5)
    assert len(explained) == 5 and "share" in repr(explained)
    assert explained.attribution.image == "red-squares.png"
    assert len(explained.heads.to_pandas()) == 5
    preview = model.preview(suppress="red", top=3, strength=0.0)
    assert preview.to_dict()["model"]["name"] == "testbed-main"
    assert preview.alphas and all(a == 0.0 for a in preview.alphas)


def test_bad_calls_raise_clear_errors(monkeypatch):
    from sith.api import Hits, Model

    with pytest.raises(InvalidInput) as err:
        sith.load(42)
    assert err.value.field == "model"
    with pytest.raises(InvalidInput):
        sith.load("no-such-model-name")
    plain = Model.__new__(Model)
    plain.loaded, plain.vocabulary = None, None
    with pytest.raises(InvalidInput) as err:
        Model.spec(plain)  # nothing to edit
    assert err.value.field == "operations"
    with pytest.raises(InvalidInput):
        Model.spec(plain, suppress=["red"], top=3, threshold=0.1)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        Hits([]).to_pandas()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_edit_on_a_gpu_plans_and_applies_as_on_the_cpu(model, tmp_path):
    """The planner's float64 algebra runs on the CPU whatever device the SVD ran on; the edited model
    stays on the GPU and writes the same α."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SITH_DATA_DIR", str(tmp_path))
        gpu = sith.load("testbed-main", device="cuda")
        edited = gpu.edit(suppress=["red"])
    cpu_alphas = model.edit(suppress=["red"]).report.alphas
    assert next(edited.model.parameters()).device.type == "cuda"
    np.testing.assert_allclose(edited.report.alphas, cpu_alphas, atol=1e-3)
