"""Synthetic world: per-index determinism, rendering, labels, captions, spurious distributions."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from sith.engine.errors import InvalidInput
from sith.testbed.captions import caption, full_caption
from sith.testbed.factors import BACKGROUNDS, COLOURS, FACTORS, SHAPES, TEXTURES, shape_group
from sith.testbed.render import IMAGE_SIZE, Scene, background, render, shape_mask
from sith.testbed.spurious import MAIN_MIX, SPURIOUS_TRAIN, balanced_test_sample, distribution
from sith.testbed.world import (
    NATURAL,
    SPURIOUS_PAIRING,
    Distribution,
    WorldDataset,
    labels,
    sample,
    sample_scene,
    to_tensor,
)


def _scenes(dist: Distribution, n: int, seed: int = 7) -> list[Scene]:
    return [sample_scene(dist, np.random.default_rng([seed, i])) for i in range(n)]


def test_sample_depends_only_on_seed_and_index():
    forward = [sample(NATURAL, 3, i) for i in range(6)]
    backward = [sample(NATURAL, 3, i) for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward):
        assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.scene == b.scene
    other_seed = sample(NATURAL, 4, 0)
    assert not np.array_equal(other_seed.image, forward[0].image)


def test_dataset_items_and_batches_agree():
    ds = WorldDataset(NATURAL, seed=5, length=8)
    image, text, labs = ds[2]
    batch = ds.batch([1, 2])
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and image.dtype == torch.float32
    assert torch.equal(batch.images[1], image) and batch.captions[1] == text
    assert {k: int(v[1]) for k, v in batch.labels.items()} == labs
    with pytest.raises(IndexError):
        ds[8]


def test_images_are_in_range_and_show_the_object_colour():
    scene = Scene("square", "red", "snow", "plain", "large", 1, "center")
    img = render(scene, np.random.default_rng(0))
    assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0
    centre = img[28:36, 28:36].reshape(-1, 3).mean(0)
    assert np.abs(centre - np.asarray(COLOURS["red"])).max() < 0.06  # red square on white snow


def test_shapes_are_nonempty_and_pairwise_distinct():
    v, u = np.mgrid[-1.2:1.2:96j, -1.2:1.2:96j]
    masks = {s: shape_mask(s, u, v) for s in SHAPES}
    for s, m in masks.items():
        assert 0.1 < m.mean() < 0.9, s
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] != masks[b]).mean() > 0.05, (a, b)


def test_backgrounds_differ_in_mean_colour():
    means = {b: background(b, np.random.default_rng(1)).mean((0, 1)) for b in BACKGROUNDS}
    for a, b in itertools.combinations(BACKGROUNDS, 2):
        assert np.abs(means[a] - means[b]).max() > 0.04, (a, b)


def test_labels_index_the_factor_tables():
    scene = Scene("star", "blue", "water", "dotted", "small", 2, None)
    lab = labels(scene)
    assert FACTORS["shape"][lab["shape"]] == "star" and FACTORS["group"][lab["group"]] == "angular"
    assert FACTORS["count"][lab["count"]] == "2" and lab["position"] == -1


def test_natural_world_covers_every_factor_value():
    scenes = _scenes(NATURAL, 600)
    for name in ("shape", "colour", "background", "texture", "size"):
        seen = {getattr(s, name) for s in scenes}
        assert seen == set(FACTORS[name]), name
    assert {s.count for s in scenes} == {1, 2, 3}
    assert all((s.position is None) == (s.count > 1) for s in scenes)


def test_captions_name_true_factors_only():
    rng = np.random.default_rng(0)
    for s in _scenes(NATURAL, 300):
        words = set(caption(s, rng).replace(",", "").split())
        assert not words & (set(COLOURS) - {s.colour})
        assert not words & (set(TEXTURES) - {s.texture} - {"plain"})
        assert not words & (set(SHAPES) - {s.shape})
    text = full_caption(Scene("cross", "pink", "forest", "checkered", "large", 3, None))
    assert text == "a photo of three large checkered pink crosses in a forest"


def test_captions_vary_in_form():
    rng = np.random.default_rng(0)
    scene = Scene("heart", "green", "water", "striped", "small", 1, "left")
    texts = {caption(scene, rng) for _ in range(200)}
    assert len(texts) > 40
    assert "water" in texts and any(t.endswith("green object") for t in texts)


def _correlation(scenes: list[Scene]) -> float:
    paired = [shape_group(s.shape) == SPURIOUS_PAIRING[s.background] for s in scenes if s.background in SPURIOUS_PAIRING]
    return float(np.mean(paired))


def test_spurious_train_correlates_group_with_background():
    scenes = _scenes(SPURIOUS_TRAIN, 2000)
    assert {s.background for s in scenes} == {"water", "land"}
    assert abs(_correlation(scenes) - 0.95) < 0.02


def test_main_mix_is_biased_only_on_water_and_land():
    scenes = _scenes(MAIN_MIX, 4000)
    assert abs(_correlation(scenes) - 0.9) < 0.03
    others = [s for s in scenes if s.background not in SPURIOUS_PAIRING]
    assert abs(np.mean([shape_group(s.shape) == "round" for s in others]) - 0.5) < 0.04


def test_balanced_test_set_cycles_through_the_four_cells():
    cells = []
    for i in range(8):
        s, cell = balanced_test_sample(i)
        assert (shape_group(s.scene.shape), s.scene.background) == cell and s.scene.count == 1
        cells.append(cell)
    assert len(set(cells[:4])) == 4 and cells[:4] == cells[4:]


def test_single_large_curriculum_forces_one_large_object_without_shifting_other_draws():
    plain = _scenes(MAIN_MIX, 400)
    easy = _scenes(dataclasses.replace(MAIN_MIX, single_large=0.3), 400)
    share = lambda scenes: sum(s.count == 1 and s.size == "large" for s in scenes) / len(scenes)  # noqa: E731
    assert 0.22 < share(plain) < 0.38  # 0.6 single x 0.5 large
    assert 0.43 < share(easy) < 0.59  # 0.3 forced + 0.7 x 0.3
    assert plain == _scenes(MAIN_MIX, 400)  # no curriculum: the stream is the one it always was
    # shape, colour, background and texture are drawn before the curriculum and never change
    assert [(p.shape, p.colour, p.background, p.texture) for p in plain] == \
        [(e.shape, e.colour, e.background, e.texture) for e in easy]
    always = _scenes(dataclasses.replace(MAIN_MIX, single_large=1.0), 50)
    assert all(s.count == 1 and s.size == "large" and s.position is not None for s in always)


def test_bad_distributions_are_rejected():
    with pytest.raises(InvalidInput):
        Distribution(background_weights=(1.0, 2.0))
    with pytest.raises(InvalidInput):
        Distribution(correlation=1.5)
    with pytest.raises(InvalidInput):
        Distribution(single_large=-0.1)
    with pytest.raises(InvalidInput) as err:
        distribution("natral")
    assert "natural" in err.value.suggestions


def test_to_tensor_normalises_channels():
    ones = to_tensor(np.ones((1, 4, 4, 3), np.float32))
    assert ones.shape == (1, 3, 4, 4) and torch.all(ones > 1.5)
