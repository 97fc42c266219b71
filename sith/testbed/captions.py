"""Captions for a scene: varied templates mentioning varied subsets of its factors.

The text tower must learn every factor word alone ("water", "something red") and in combination
("a photo of two small striped blue circles in the snow"), and it must see the phrasings the
zero-shot prompts use ("a photo of a red object"), so the mix below covers rich noun phrases,
one- or two-factor "object" phrases, bare words and short sentences.
"""

from __future__ import annotations

import numpy as np

from sith.testbed.factors import (
    BACKGROUND_NOUNS,
    BACKGROUND_PHRASES,
    COUNT_WORDS,
    PLURALS,
    POSITION_PHRASES,
    article,
    shape_group,
)
from sith.testbed.render import Scene

PREFIXES: tuple[str, ...] = ("", "", "a photo of ", "an image of ", "a picture of ", "a rendering of ")
# Kind of caption -> probability.
KINDS: dict[str, float] = {"rich": 0.5, "object": 0.3, "bare": 0.08, "sentence": 0.12}


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str, count: int, rng: np.random.Generator) -> str:
    if count == 1:
        return f"{'one' if rng.random() < 0.15 else article(phrase)} {phrase}"
    return f"{COUNT_WORDS[count]} {phrase}"


def _noun_phrase(scene: Scene, rng: np.random.Generator, p: float) -> str:
    """'[count] [size] [texture] [colour] shape(s)', each modifier kept with probability ~p."""
    words = []
    if rng.random() < p:
        words.append(scene.size)
    if rng.random() < p * 0.8 and scene.texture != "plain" or rng.random() < 0.1:
        words.append(scene.texture)
    if rng.random() < min(1.0, p + 0.15):
        words.append(scene.colour)
    words.append(PLURALS[scene.shape] if scene.count > 1 else scene.shape)
    return _with_article(" ".join(words), scene.count, rng)


def _rich(scene: Scene, rng: np.random.Generator) -> str:
    text = _noun_phrase(scene, rng, p=float(rng.uniform(0.5, 0.95)))
    if rng.random() < 0.75:
        text += " " + _pick(rng, BACKGROUND_PHRASES[scene.background])
    if scene.position is not None and rng.random() < 0.4:
        text += " " + POSITION_PHRASES[scene.position]
    return _pick(rng, PREFIXES) + text


def _object(scene: Scene, rng: np.random.Generator) -> str:
    """One or two factors on a generic noun: 'a red object', 'something on water', 'a round shape'."""
    plural = scene.count > 1
    noun = "objects" if plural else "object"
    choices = ["colour", "shape", "background", "texture", "size", "count", "group"]
    if scene.position is not None:
        choices.append("position")
    factor = _pick(rng, choices)
    bg = _pick(rng, BACKGROUND_PHRASES[scene.background])
    if factor == "colour":
        text = f"something {scene.colour}" if rng.random() < 0.3 else _with_article(f"{scene.colour} {noun}", scene.count, rng)
    elif factor == "shape":
        text = _with_article(PLURALS[scene.shape] if plural else scene.shape, scene.count, rng)
    elif factor == "background":
        text = f"{'some things' if plural else 'something'} {bg}" if rng.random() < 0.5 else _with_article(f"{noun} {bg}", scene.count, rng)
    elif factor == "texture":
        text = _with_article(f"{scene.texture} {noun}", scene.count, rng)
    elif factor == "size":
        text = _with_article(f"{scene.size} {noun}", scene.count, rng)
    elif factor == "count":
        text = f"{COUNT_WORDS[scene.count]} {noun}"
    elif factor == "group":
        shapes = "shapes" if plural else "shape"
        text = _with_article(f"{shape_group(scene.shape)} {shapes}", scene.count, rng)
    else:
        text = _with_article(f"{noun} {POSITION_PHRASES[scene.position]}", scene.count, rng)
    if factor != "background" and rng.random() < 0.2:
        text += " " + bg
    return _pick(rng, PREFIXES) + text


def _bare(scene: Scene, rng: np.random.Generator) -> str:
    factor = _pick(rng, ("background", "colour", "shape", "texture"))
    if factor == "background":
        return scene.background
    if factor == "colour":
        return scene.colour
    if factor == "shape":
        return scene.shape
    return scene.texture if scene.texture != "plain" else scene.colour


def _sentence(scene: Scene, rng: np.random.Generator) -> str:
    thing = _noun_phrase(scene, rng, p=0.6)
    form = int(rng.integers(3))
    if form == 0:
        verb = "is" if scene.count == 1 else "are"
        return f"there {verb} {thing} {_pick(rng, BACKGROUND_PHRASES[scene.background])}"
    if form == 1:
        return f"{BACKGROUND_NOUNS[scene.background]} with {thing}"
    return f"{thing}, {_pick(rng, BACKGROUND_PHRASES[scene.background])}"


_BUILDERS = {"rich": _rich, "object": _object, "bare": _bare, "sentence": _sentence}


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption of `scene` (deterministic given the generator state)."""
    kind = rng.choice(list(KINDS), p=list(KINDS.values()))
    return _BUILDERS[str(kind)](scene, rng)


def full_caption(scene: Scene) -> str:
    """The one caption naming every factor (retrieval evaluation: as unambiguous as the world allows)."""
    noun = PLURALS[scene.shape] if scene.count > 1 else scene.shape
    count = COUNT_WORDS[scene.count] if scene.count > 1 else article(scene.size)
    text = f"a photo of {count} {scene.size} {scene.texture} {scene.colour} {noun} {BACKGROUND_PHRASES[scene.background][0]}"
    if scene.position is not None:
        text += " " + POSITION_PHRASES[scene.position]
    return text
