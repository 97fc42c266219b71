"""Joint-space mapping (ln_post with bias, P, centring), its approximate inverse and image means."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from sith.engine.decomposition import decompose
from sith.engine.errors import InvalidInput
from sith.engine.jointspace import JointSpace, directions_mean, resolve_image_mean
from sith.engine.models import load_model

TINY_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CFG)
    with torch.no_grad():
        model.visual.ln_post.weight.uniform_(0.5, 1.5)
        model.visual.ln_post.bias.normal_()
    cfg = tmp_path_factory.mktemp("cfg") / "tiny.json"
    cfg.write_text(json.dumps(TINY_CFG))
    weights = cfg.with_name("tiny.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return load_model(config=cfg, checkpoint=weights)


def _unit_zero_mean(n: int, d: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return F.normalize(v - v.mean(dim=1, keepdim=True), dim=1)


def test_map_is_full_ln_post_then_projection(loaded):
    visual = loaded.model.visual
    v = _unit_zero_mean(10, 64)
    space = JointSpace.for_model(loaded, None)
    z = space.map(v)
    assert z.shape == (10, 24)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(10))
    # closed form for zero-mean unit v (spec §1.7): γ ⊙ v / sqrt(1/d + eps) + β, then P
    ln = visual.ln_post
    expected = F.normalize((ln.weight * v / (1 / 64 + ln.eps) ** 0.5 + ln.bias) @ visual.proj, dim=1)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    # the bias matters: without it directions map elsewhere
    no_bias = torch.nn.LayerNorm(64)
    no_bias.load_state_dict({"weight": ln.weight.detach(), "bias": torch.zeros(64)})
    z0 = JointSpace(no_bias, visual.proj, None).map(v)
    assert (z - z0).abs().max() > 1e-2


def test_centring_and_inverse(loaded):
    v = _unit_zero_mean(6, 64, seed=1)
    mean = torch.randn(24, generator=torch.Generator().manual_seed(2)) * 0.1
    plain = JointSpace.for_model(loaded, None)
    centred = JointSpace.for_model(loaded, mean)
    t = centred.map(v)
    torch.testing.assert_close(t, F.normalize(plain.map(v) - mean, dim=1))
    torch.testing.assert_close(t.norm(dim=1), torch.ones(6))
    # spec §1.8 written out
    proj = loaded.model.visual.proj.detach().double()
    expected = F.normalize((F.normalize(F.normalize(t, dim=1) + mean, dim=1).double() @ torch.linalg.pinv(proj)), dim=1)
    back = centred.inverse(t)
    assert back.shape == (6, 64)
    torch.testing.assert_close(back, expected.float(), atol=1e-5, rtol=1e-5)


def test_inverse_recovers_the_row_space_component():
    """With an identity ln_post and no mean, inverse(map(v)) is v projected onto P's row space."""
    torch.manual_seed(4)
    proj = torch.randn(64, 24)
    space = JointSpace(torch.nn.LayerNorm(64), proj, None)
    v = _unit_zero_mean(5, 64, seed=3)
    expected = F.normalize(v @ proj @ torch.linalg.pinv(proj), dim=1)
    torch.testing.assert_close(space.inverse(space.map(v)), expected, atol=1e-5, rtol=1e-5)


def test_directions_mean_covers_every_head_of_every_layer(loaded):
    mean = resolve_image_mean(loaded, "directions")
    assert mean.shape == (24,)
    svds = decompose(loaded, list(range(loaded.info.layers)))
    vectors = torch.cat([s.V.transpose(1, 2).reshape(-1, 64) for s in svds.values()])
    assert vectors.shape[0] == 3 * 4 * 16
    torch.testing.assert_close(mean, JointSpace.for_model(loaded, None).map(vectors).mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(directions_mean(loaded), mean)


def test_none_and_tensor_inputs(loaded, tmp_path):
    assert resolve_image_mean(loaded, None) is None
    assert resolve_image_mean(loaded, "none") is None
    mean = torch.randn(24)
    torch.testing.assert_close(resolve_image_mean(loaded, mean[None]), mean)
    torch.save(mean, tmp_path / "m.pt")
    np.save(tmp_path / "m.npy", mean.numpy())
    save_file({"mean": mean}, str(tmp_path / "m.safetensors"))
    for name in ("m.pt", "m.npy", "m.safetensors"):
        torch.testing.assert_close(resolve_image_mean(loaded, tmp_path / name), mean)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: torch.save(torch.randn(7), d / "bad.pt") or d / "bad.pt", "expected shape [24]"),
        (lambda d: save_file({"a": torch.randn(24), "b": torch.randn(24)}, str(d / "two.safetensors"))
         or d / "two.safetensors", "exactly one"),
        (lambda d: (d / "m.txt").write_text("1") and d / "m.txt", "unsupported file type"),
        (lambda d: "average", "is not 'poles', 'directions', 'null-images', 'none'"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no images"),
    ],
)
def test_bad_image_means(loaded, tmp_path, make, fragment):
    with pytest.raises(InvalidInput) as err:
        resolve_image_mean(loaded, make(tmp_path))
    assert err.value.field == "image_mean"
    assert fragment in err.value.reason


def test_image_folder_mean(loaded, tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        (tmp_path / "sub").mkdir(exist_ok=True)
        image.save(tmp_path / ("sub" if i else ".") / f"im{i}.png")
        images.append(image)
    (tmp_path / "notes.txt").write_text("not an image")
    mean = resolve_image_mean(loaded, tmp_path)
    with torch.no_grad():
        batch = torch.stack([loaded.preprocess(im) for im in images])
        expected = loaded.model.encode_image(batch, normalize=True).mean(0)
    torch.testing.assert_close(mean, expected, atol=1e-6, rtol=1e-5)


def test_poles_mean_does_not_depend_on_the_sign_rule(loaded) -> None:
    from sith.engine.decomposition import decompose_layer
    from sith.engine.jointspace import poles_mean

    space = JointSpace.for_model(loaded, None)
    total, count = torch.zeros(loaded.info.output_dim, dtype=torch.float64), 0
    for layer, block in enumerate(loaded.model.visual.transformer.resblocks):
        v = decompose_layer(block, loaded.info.heads, layer).V
        vectors = v.transpose(1, 2).reshape(-1, v.shape[1])
        flips = torch.where(torch.arange(vectors.shape[0]) % 3 == 0, -1.0, 1.0)[:, None]  # another sign rule
        flipped = vectors * flips
        total += (space.project(flipped).double().sum(0) + space.project(-flipped).double().sum(0)).cpu()
        count += 2 * vectors.shape[0]
    torch.testing.assert_close(poles_mean(loaded), (total / count).float(), atol=1e-5, rtol=0)


def test_null_images_are_deterministic_and_content_free(loaded) -> None:
    from sith.engine.jointspace import null_image_mean, null_images

    images = null_images(16)
    assert images.shape == (27 + 12 + 8, 3, 16, 16)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(images, null_images(16))
    assert torch.equal(images[0], torch.zeros(3, 16, 16))  # the first flat colour is black
    mean = null_image_mean(loaded)
    assert mean.shape == (loaded.info.output_dim,) and 0 < float(mean.norm()) <= 1.0 + 1e-5


@pytest.mark.parametrize("name", ["poles", "directions", "null-images", "POLES"])
def test_data_free_means_by_name(loaded, name) -> None:
    from sith.engine.jointspace import DATA_FREE_MEANS, DEFAULT_IMAGE_MEAN

    assert DEFAULT_IMAGE_MEAN == "poles"
    mean = resolve_image_mean(loaded, name)
    torch.testing.assert_close(mean, DATA_FREE_MEANS[name.lower()](loaded))
