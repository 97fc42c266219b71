"""Vectorised numpy drawing of one scene: a textured background and 1-3 textured objects.

Every shape is a boolean mask computed from a coordinate grid in the object's own normalised
frame (u, v in [-1, 1] over the object's half-extent), so drawing costs a handful of array ops
and no Python loops over pixels. All randomness (jitter, phases, noise) comes from the caller's
generator, which keeps each sample a pure function of (seed, index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sith.testbed.factors import COLOURS

IMAGE_SIZE = 64
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)

# Object half-extent in pixels.
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (6.0, 8.0), "large": (11.5, 13.5)}
# Single-object anchor points (x, y); multi-object layouts use the slot lists below.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (17.0, 32.0),
    "right": (47.0, 32.0),
    "top": (32.0, 17.0),
    "bottom": (32.0, 47.0),
    "center": (32.0, 32.0),
}
COUNT_SLOTS: dict[int, tuple[tuple[float, float], ...]] = {
    2: ((17.0, 32.0), (47.0, 32.0)),
    3: ((17.0, 19.0), (47.0, 19.0), (32.0, 47.0)),
}


@dataclass(frozen=True)
class Scene:
    """The factor values of one image (its ground truth)."""

    shape: str
    colour: str
    background: str
    texture: str
    size: str
    count: int
    position: str | None  # None when count > 1 (objects are spread over fixed slots)


# ----------------------------------------------------------------------------- shapes


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of `shape` in normalised coordinates (v points down, as in images)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 0.92
    if shape == "oval":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.15
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if shape == "moon":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + (v + 0.15) ** 2 >= 0.62)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":
        return (v <= 0.75) & (v >= -1.0 + 1.75 * np.abs(u))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if shape == "star":
        sector = 2.0 * np.pi / 5.0
        angle = np.mod(np.arctan2(v, u) + np.pi / 2.0 + sector / 2.0, sector) - sector / 2.0
        edge = 0.42 + 0.58 * (1.0 - np.abs(angle) / (sector / 2.0))
        return np.sqrt(r2) <= edge
    raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------- object paint


def _shade(colour: np.ndarray) -> np.ndarray:
    """The second colour of a pattern: darker, or lighter for very dark colours."""
    return colour * 0.5 if colour.mean() > 0.2 else colour + 0.35


def object_paint(texture: str, colour: np.ndarray, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    """[H, W, 3] paint of an object's surface; only read inside its mask."""
    xx, yy = _XX + phase, _YY + phase
    if texture == "plain":
        return np.broadcast_to(colour, (*u.shape, 3))
    if texture == "metallic":
        light = np.clip(0.55 + 0.45 * (-u - v) + 0.6 * np.exp(-4.0 * ((u + 0.35) ** 2 + (v + 0.35) ** 2)), 0.3, 1.6)
        return np.clip(colour * light[..., None] + 0.15 * (light[..., None] - 1.0).clip(0), 0.0, 1.0)
    if texture == "striped":
        second = np.floor((xx + yy) / 3.0) % 2 == 1
    elif texture == "dotted":
        second = ((xx % 5.0) - 2.5) ** 2 + ((yy % 5.0) - 2.5) ** 2 <= 1.7
    elif texture == "checkered":
        second = (np.floor(xx / 3.5) + np.floor(yy / 3.5)) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.where(second[..., None], _shade(colour), colour)


# ----------------------------------------------------------------------------- backgrounds


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """[H, W] value noise in [0, 1]: a cells x cells grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    pos = np.linspace(0.0, cells, IMAGE_SIZE, dtype=np.float32)
    i = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # [H, cells+1]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _mix(a: tuple[float, ...], b: tuple[float, ...], t: np.ndarray) -> np.ndarray:
    a_, b_ = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a_ + (b_ - a_) * t[..., None]


def background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float32 texture of one background kind, randomised by `rng`."""
    grain = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    if kind == "water":  # blue, wavy horizontal stripes
        freq, amp, p1, p2 = rng.uniform(0.55, 0.9), rng.uniform(1.0, 2.5), *rng.uniform(0, 2 * np.pi, 2)
        waves = np.sin(_YY * freq + amp * np.sin(_XX * 0.25 + p1) + p2)
        img = _mix((0.06, 0.28, 0.62), (0.35, 0.65, 0.92), 0.5 + 0.5 * waves) + 0.03 * grain[..., None]
    elif kind == "land":  # green/brown patches
        t = 0.65 * _smooth_noise(rng, 4) + 0.35 * _smooth_noise(rng, 12)
        img = _mix((0.28, 0.52, 0.14), (0.48, 0.34, 0.16), t) + 0.06 * grain[..., None]
    elif kind == "sand":  # pale tan with fine ripples
        ripples = np.sin(_XX * 0.35 + _YY * 1.1 + rng.uniform(0, 2 * np.pi))
        img = _mix((0.80, 0.68, 0.44), (0.92, 0.83, 0.60), 0.5 + 0.3 * ripples + 0.2 * _smooth_noise(rng, 6))
        img = img + 0.03 * grain[..., None]
    elif kind == "snow":  # near-white with cool speckles
        t = 0.7 * _smooth_noise(rng, 5) + 0.3 * (grain > 1.3)
        img = _mix((0.97, 0.98, 1.0), (0.78, 0.84, 0.93), t)
    elif kind == "sky":  # vertical blue gradient with soft clouds
        img = _mix((0.30, 0.55, 0.95), (0.70, 0.85, 1.0), _YY / IMAGE_SIZE)
        clouds = np.clip((_smooth_noise(rng, 4) - 0.55) * 4.0, 0.0, 1.0)
        img = img * (1 - clouds[..., None]) + clouds[..., None] * 0.97 + 0.015 * grain[..., None]
    elif kind == "brick":  # red-brown bricks with pale mortar, staggered rows
        ox, oy = rng.uniform(0, 16), rng.uniform(0, 8)
        row = np.floor((_YY + oy) / 8.0)
        xs = _XX + ox + 8.0 * (row % 2)
        mortar = ((_YY + oy) % 8.0 < 1.2) | (xs % 16.0 < 1.2)
        tone = _smooth_noise(rng, 8)
        img = _mix((0.55, 0.18, 0.10), (0.72, 0.32, 0.18), tone) + 0.03 * grain[..., None]
        img = np.where(mortar[..., None], np.float32(0.78), img)
    elif kind == "forest":  # dark green foliage with brown vertical trunks
        period, phase = rng.uniform(11, 17), rng.uniform(0, 17)
        trunks = (_XX + phase) % period < 2.5 + 0.6 * np.sin(_YY * 0.3)
        leaves = _smooth_noise(rng, 10)
        img = _mix((0.05, 0.22, 0.07), (0.20, 0.45, 0.15), leaves) + 0.04 * grain[..., None]
        img = np.where(trunks[..., None], np.asarray((0.33, 0.20, 0.09), np.float32), img)
    elif kind == "night":  # dark navy with sparse stars
        img = _mix((0.01, 0.01, 0.06), (0.06, 0.07, 0.22), _YY / IMAGE_SIZE)
        img = np.where((grain > 2.6)[..., None], np.float32(0.95), img)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- scene


def object_centres(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    anchors = [POSITION_ANCHORS[scene.position]] if scene.count == 1 else list(COUNT_SLOTS[scene.count])
    jitter = rng.uniform(-2.5, 2.5, size=(len(anchors), 2))
    return [(x + dx, y + dy) for (x, y), (dx, dy) in zip(anchors, jitter)]


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float32 image in [0, 1]."""
    img = background(scene.background, rng)
    colour = np.clip(np.asarray(COLOURS[scene.colour], np.float32) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    colour = colour.astype(np.float32)
    low, high = SIZE_RADIUS[scene.size]
    radius = rng.uniform(low, high)
    angle = rng.uniform(-0.25, 0.25)  # small rotation so shapes are not pixel-identical
    cos, sin = np.cos(angle), np.sin(angle)
    phase = rng.uniform(0, 6)
    for cx, cy in object_centres(scene, rng):
        dx, dy = (_XX - cx) / radius, (_YY - cy) / radius
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        mask = shape_mask(scene.shape, u, v)
        # A soft drop shadow keeps same-coloured objects visible (white on snow, blue on water).
        shadow = np.zeros_like(mask)
        shadow[2:, 2:] = mask[:-2, :-2]
        img = np.where((shadow & ~mask)[..., None], img * 0.55, img)
        img = np.where(mask[..., None], object_paint(scene.texture, colour, u, v, phase), img)
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)
