"""Explain one image: the head writes it reconstructs are the model's own, shares add up, an edit of
a vector removes exactly that vector's part, and the CLI/engine results rank and label it."""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from edits_fixtures import TINY_CFG, images, tiny_clip
from sith.edits.apply import apply_multipliers
from sith.edits.multipliers import Multipliers
from sith.engine.attribution import attribute_image, pixels_for, raw_attribution
from sith.engine.decomposition import decompose
from sith.engine.errors import InvalidInput
from sith.engine.models import load_reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_clip()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return load_reference(str(folder))


def _cls_outputs(model, pixels):
    """Oracle from plain forward hooks: CLS of ln_pre's output, every attention and MLP output, the
    ln_post input, and the embedding."""
    visual = model.visual
    seen, handles = {}, []
    for i, block in enumerate(visual.transformer.resblocks):
        handles.append(block.attn.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("attn", i), o[0][0, 0])))
        handles.append(block.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("mlp", i), o[0, 0])))
    handles.append(visual.ln_pre.register_forward_hook(lambda m, a, o: seen.__setitem__("pre", o[0, 0])))
    handles.append(visual.ln_post.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0][0, 0])))
    with torch.no_grad():
        z = model.encode_image(pixels)[0]
    for h in handles:
        h.remove()
    return seen, z


def _share(model, final, z, piece):
    """Independent frozen-ln_post share of one residual piece."""
    ln = model.visual.ln_post
    sigma = torch.sqrt(final.var(unbiased=False) + ln.eps)
    joint = (ln.weight * (piece - piece.mean())) / sigma @ model.visual.proj
    return float(joint @ F.normalize(z, dim=0) / z.norm())


def test_head_writes_are_the_models_own_and_shares_add_up_to_one(tiny):
    pixels = images(1)
    layers = list(range(tiny.info.layers))
    raw = raw_attribution(tiny, pixels, decompose(tiny, layers))
    seen, z = _cls_outputs(tiny.model, pixels)
    assert torch.allclose(raw.embedding, z, atol=1e-5)
    total = 0.0
    for layer in layers:
        attn = tiny.model.visual.transformer.resblocks[layer].attn
        rebuilt = raw.writes[layer].sum(0) + attn.out_proj.bias
        actual = seen[("attn", layer)]
        assert torch.allclose(rebuilt - rebuilt.mean(), actual - actual.mean(), atol=1e-4), layer
        # the vectors' shares + constants + the out bias = the attention output's share
        heads = float(raw.shares[layer].sum() + raw.constants[layer].sum())
        assert heads + _share(tiny.model, seen["final"], z, attn.out_proj.bias) == \
            pytest.approx(_share(tiny.model, seen["final"], z, actual), abs=1e-4)
        total += _share(tiny.model, seen["final"], z, actual) + _share(tiny.model, seen["final"], z, seen[("mlp", layer)])
    total += _share(tiny.model, seen["final"], z, seen["pre"])
    beta = float(tiny.model.visual.ln_post.bias @ tiny.model.visual.proj @ F.normalize(z, dim=0) / z.norm())
    assert total + beta == pytest.approx(1.0, abs=1e-4)  # every piece of the residual stream: exactly 1


def test_editing_a_vector_removes_exactly_its_part(tiny):
    pixels = images(1, seed=3)
    layer = tiny.info.layers - 1
    decomposition = decompose(tiny, [layer])
    raw = raw_attribution(tiny, pixels, decomposition)
    head, j = divmod(int(raw.shares[layer].abs().argmax()), raw.shares[layer].shape[1])
    values = torch.ones_like(decomposition[layer].S)
    values[head, j] = 0.0
    edited = apply_multipliers(tiny.model, Multipliers({layer: values}), decomposition)
    before, _ = _cls_outputs(tiny.model, pixels)
    after, _ = _cls_outputs(edited, pixels)
    change = after[("attn", layer)] - before[("attn", layer)]
    expected = -raw.coefficients[layer][head, j] * decomposition[layer].V[head][:, j]
    assert torch.allclose(change - change.mean(), expected, atol=1e-4)
    assert raw.coefficients[layer][head, j].abs() > 1e-3  # a real part, not a vanishing one


@pytest.fixture(scope="module")
def testbed_analyzer():
    from sith.engine.analysis import Analyzer
    from sith.engine.dictionary import build_dictionary
    from sith.testbed.vocabulary import vocabulary_for

    loaded = load_reference("testbed-main")
    return Analyzer(loaded, build_dictionary(loaded, vocabulary_for(loaded)))


def _render(index: int, seed: int = 4242):
    from sith.testbed.world import NATURAL, sample

    drawn = sample(NATURAL, seed, index)
    return Image.fromarray((drawn.image * 255.0 + 0.5).astype(np.uint8)), drawn.scene


@pytest.mark.slow
def test_testbed_image_ranked_and_explained(testbed_analyzer):
    image, scene = _render(3)
    result = attribute_image(testbed_analyzer, image, top=6, vectors_per_head=2)
    assert len(result.vectors) == 6 and len(result.heads) == 6
    assert all(len(h.vectors) == 2 for h in result.heads)
    shares = [abs(v.share) for v in result.vectors]
    assert shares == sorted(shares, reverse=True)
    assert result.layers == [2, 3, 4, 5]
    assert result.analysed_share + result.constant_share + result.rest == pytest.approx(1.0)
    assert all(v.concepts for v in result.vectors)
    # the image's own words (its colour, its shape) are among the closest concepts to its embedding
    from sith.testbed.factors import PLURALS

    assert {scene.colour, scene.shape, PLURALS[scene.shape]} & {c for c, _ in result.image_concepts}


@pytest.mark.slow
def test_cli_explain_image(tmp_path, monkeypatch):
    from sith.cli import main

    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path / "data"))
    image, _ = _render(5)
    path = tmp_path / "object.png"
    image.save(path)
    result = CliRunner().invoke(main, ["explain-image", str(path), "--top", "4", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "testbed-main" and data["image"] == "object.png" and len(data["vectors"]) == 4
    table = CliRunner().invoke(main, ["explain-image", str(path), "--top", "3", "-l", "-1"])
    assert table.exit_code == 0 and "what makes up the embedding of object.png" in table.output
    bad = CliRunner().invoke(main, ["explain-image", str(tmp_path / "data")])
    assert bad.exit_code == 2


def test_bad_images_and_towers_are_refused(tiny, tmp_path):
    with pytest.raises(InvalidInput) as err:
        pixels_for(tiny, tmp_path / "missing.png")
    assert err.value.field == "image"
    (tmp_path / "not-an-image.png").write_bytes(b"plain text")
    with pytest.raises(InvalidInput, match="cannot read"):
        pixels_for(tiny, tmp_path / "not-an-image.png")
    with pytest.raises(InvalidInput):
        pixels_for(tiny, torch.zeros(2, 3, 32, 32))
    with pytest.raises(InvalidInput):
        pixels_for(tiny, 42)
    cfg = copy.deepcopy(TINY_CFG)
    cfg["vision_cfg"]["pool_type"] = "avg"
    pooled = open_clip.model.CLIP(**cfg).eval()
    swapped = type(tiny)(**{**tiny.__dict__, "model": pooled})
    with pytest.raises(InvalidInput, match="CLS"):
        raw_attribution(swapped, images(1), decompose(tiny, [0]))
