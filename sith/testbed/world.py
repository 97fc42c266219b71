"""The synthetic image-caption world: scene sampling, per-index determinism, datasets.

Sample ``i`` of a stream is a pure function of ``(seed, i)`` (its generator is seeded with both),
so any batch, worker split or evaluation run sees the same image, caption and labels. Training
seeds stay below ``HELDOUT_SEED``; evaluation uses seeds from ``HELDOUT_SEED`` up, so held-out
images never appear in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sith.engine.errors import InvalidInput
from sith.testbed.captions import caption
from sith.testbed.factors import (
    ANGULAR_SHAPES,
    BACKGROUNDS,
    COLOURS,
    COUNTS,
    FACTORS,
    POSITIONS,
    ROUND_SHAPES,
    SIZES,
    TEXTURES,
    shape_group,
)
from sith.testbed.render import Scene, render

HELDOUT_SEED = 1_000_000
# open_clip's OPENAI_DATASET_MEAN/STD: the checkpoints' preprocess_cfg uses the same values, so
# world tensors equal what open_clip's eval transform makes of the same image saved as a PNG.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# Which shape group "belongs" to which background in the spurious (Waterbirds-like) distributions.
SPURIOUS_PAIRING: dict[str, str] = {"water": "round", "land": "angular"}
GROUP_SHAPES: dict[str, tuple[str, ...]] = {"round": ROUND_SHAPES, "angular": ANGULAR_SHAPES}


@dataclass(frozen=True)
class Distribution:
    """How scenes are drawn. The default is the natural world: every factor independent, uniform."""

    name: str = "natural"
    background_weights: Sequence[float] | None = None  # over BACKGROUNDS; None = uniform
    count_weights: Sequence[float] = (0.6, 0.25, 0.15)  # over COUNTS
    correlation: float | None = None  # P(shape group follows SPURIOUS_PAIRING) on water/land images
    group: str | None = None  # fix the shape group (cells of the balanced spurious test set)
    single_large: float = 0.0  # P(the scene is forced to one large object): an easy curriculum for shape

    def __post_init__(self) -> None:
        if self.background_weights is not None and len(self.background_weights) != len(BACKGROUNDS):
            raise InvalidInput("background_weights", f"needs {len(BACKGROUNDS)} weights, one per background")
        if len(self.count_weights) != len(COUNTS):
            raise InvalidInput("count_weights", f"needs {len(COUNTS)} weights, one per count")
        if self.correlation is not None and not 0.0 <= self.correlation <= 1.0:
            raise InvalidInput("correlation", "must be a probability in [0, 1]")
        if self.group is not None and self.group not in GROUP_SHAPES:
            raise InvalidInput("group", f"unknown shape group {self.group!r}", suggestions=list(GROUP_SHAPES))
        if not 0.0 <= self.single_large <= 1.0:
            raise InvalidInput("single_large", "must be a probability in [0, 1]")


NATURAL = Distribution()


def on_background(dist: Distribution, background: str) -> Distribution:
    """`dist` restricted to one background (its shape-group correlation still applies)."""
    weights = tuple(1.0 if bg == background else 0.0 for bg in BACKGROUNDS)
    return dataclasses.replace(dist, name=f"{dist.name}@{background}", background_weights=weights)


def _normalised(weights: Sequence[float] | None, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def sample_scene(dist: Distribution, rng: np.random.Generator) -> Scene:
    """Draw the factor values of one scene."""
    bg = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=_normalised(dist.background_weights, len(BACKGROUNDS)))]
    group = dist.group
    if group is None and dist.correlation is not None and bg in SPURIOUS_PAIRING:
        paired = SPURIOUS_PAIRING[bg]
        other = next(g for g in GROUP_SHAPES if g != paired)
        group = paired if rng.random() < dist.correlation else other
    shapes = GROUP_SHAPES[group] if group is not None else ROUND_SHAPES + ANGULAR_SHAPES
    count = COUNTS[rng.choice(len(COUNTS), p=_normalised(dist.count_weights, len(COUNTS)))]
    colours = tuple(COLOURS)
    shape = shapes[rng.integers(len(shapes))]
    colour = colours[rng.integers(len(colours))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    size = SIZES[rng.integers(len(SIZES))]
    # Drawn only when asked for, so distributions without it keep their exact streams.
    if dist.single_large and rng.random() < dist.single_large:
        count, size = 1, "large"
    return Scene(
        shape=shape,
        colour=colour,
        background=bg,
        texture=texture,
        size=size,
        count=count,
        position=POSITIONS[rng.integers(len(POSITIONS))] if count == 1 else None,
    )


def labels(scene: Scene) -> dict[str, int]:
    """Factor name -> index into FACTORS[name] (position is -1 for multi-object scenes)."""
    values = {
        "shape": scene.shape,
        "colour": scene.colour,
        "background": scene.background,
        "texture": scene.texture,
        "size": scene.size,
        "count": str(scene.count),
        "group": shape_group(scene.shape),
    }
    out = {name: FACTORS[name].index(value) for name, value in values.items()}
    out["position"] = -1 if scene.position is None else POSITIONS.index(scene.position)
    return out


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    caption: str
    scene: Scene


def sample(dist: Distribution, seed: int, index: int, **overrides) -> Sample:
    """Sample `index` of the stream `(dist, seed)`; independent of any other index.

    `overrides` force Scene fields (hard-negative training batches share some within a group).
    """
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(dist, rng)
    if overrides:
        scene = dataclasses.replace(scene, **overrides)
    image = render(scene, rng)
    return Sample(image=image, caption=caption(scene, rng), scene=scene)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> [B, 3, H, W] normalised with MEAN/STD."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] normalised
    captions: list[str]
    labels: dict[str, torch.Tensor]  # factor -> [B] long
    scenes: list[Scene]


def make_batch(samples: Sequence[Sample]) -> Batch:
    scene_labels = [labels(s.scene) for s in samples]
    return Batch(
        images=to_tensor(np.stack([s.image for s in samples])),
        captions=[s.caption for s in samples],
        labels={k: torch.tensor([lab[k] for lab in scene_labels]) for k in scene_labels[0]},
        scenes=[s.scene for s in samples],
    )


class WorldDataset(torch.utils.data.Dataset):
    """`length` samples of the stream `(dist, seed)`; item = (image tensor, caption, labels dict)."""

    def __init__(self, dist: Distribution = NATURAL, seed: int = 0, length: int = 10_000) -> None:
        if length < 1:
            raise InvalidInput("length", "must be at least 1")
        self.dist, self.seed, self.length = dist, seed, length

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return sample(self.dist, self.seed, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, dict[str, int]]:
        s = self.sample(index)
        return to_tensor(s.image[None])[0], s.caption, labels(s.scene)

    def batch(self, indices: Sequence[int]) -> Batch:
        return make_batch([self.sample(i) for i in indices])
