"""The factors of the synthetic world and the words that name them.

Everything that generates or evaluates the testbed reads its vocabulary from here, so a caption
word and a zero-shot prompt can never drift apart.
"""

from __future__ import annotations

# Shapes come in two groups: the label of the spurious split (the Waterbirds analogue).
ROUND_SHAPES: tuple[str, ...] = ("circle", "oval", "ring", "heart", "moon")
ANGULAR_SHAPES: tuple[str, ...] = ("square", "triangle", "diamond", "cross", "star")
SHAPES: tuple[str, ...] = ROUND_SHAPES + ANGULAR_SHAPES
SHAPE_GROUPS: tuple[str, ...] = ("round", "angular")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

# RGB in [0, 1]; hues chosen to be told apart at a glance.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.10, 0.72, 0.15),
    "blue": (0.10, 0.25, 0.92),
    "yellow": (0.96, 0.90, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.55, 0.12, 0.78),
    "pink": (1.00, 0.52, 0.78),
    "white": (0.98, 0.98, 0.98),
    "black": (0.04, 0.04, 0.04),
    "brown": (0.50, 0.29, 0.10),
}

BACKGROUNDS: tuple[str, ...] = ("water", "land", "sand", "snow", "sky", "brick", "forest", "night")
# The first phrase of each list is the canonical one (zero-shot prompts use it).
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "water": ("on water", "in the water", "over water"),
    "land": ("on land", "on the land"),
    "sand": ("on sand", "in the sand"),
    "snow": ("in the snow", "on snow"),
    "sky": ("in the sky", "against the sky"),
    "brick": ("on a brick wall", "in front of a brick wall"),
    "forest": ("in a forest", "in the forest"),
    "night": ("at night", "in the night"),
}
# Background words usable as a bare noun ("water", "snow with a red star").
BACKGROUND_NOUNS: dict[str, str] = {
    "water": "water",
    "land": "land",
    "sand": "sand",
    "snow": "snow",
    "sky": "sky",
    "brick": "a brick wall",
    "forest": "a forest",
    "night": "the night sky",
}

TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "metallic")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
COUNTS: tuple[int, ...] = (1, 2, 3)
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# Factor name -> its values (as strings), in label-index order.
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": BACKGROUNDS,
    "texture": TEXTURES,
    "size": SIZES,
    "position": POSITIONS,
    "count": tuple(str(c) for c in COUNTS),
    "group": SHAPE_GROUPS,
}


def shape_group(shape: str) -> str:
    """'round' or 'angular'."""
    return "round" if shape in ROUND_SHAPES else "angular"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
