"""The spurious-correlation split (a Waterbirds analogue) and the training mixes built on it.

Label: the shape group, "round" (circle, oval, ring, heart, moon) vs "angular" (square, triangle,
diamond, cross, star). Spurious attribute: the background, water vs land. In the spurious
training distribution round shapes sit on water and angular shapes on land 95% of the time; the
balanced test set has the four (group, background) cells in equal numbers, so a model that reads
the background instead of the shape loses accuracy on the two minority cells (round-on-land,
angular-on-water) — the worst group an edit removing background concepts should raise.
"""

from __future__ import annotations

from sith.engine.errors import InvalidInput
from sith.testbed.factors import BACKGROUNDS
from sith.testbed.world import HELDOUT_SEED, NATURAL, SPURIOUS_PAIRING, Distribution, Sample, sample

SPURIOUS_BACKGROUNDS: tuple[str, ...] = tuple(SPURIOUS_PAIRING)  # ("water", "land")
GROUP_CELLS: tuple[tuple[str, str], ...] = (
    ("round", "water"),
    ("round", "land"),
    ("angular", "water"),
    ("angular", "land"),
)


def _weights(**overrides: float) -> tuple[float, ...]:
    return tuple(overrides.get(bg, 0.0) for bg in BACKGROUNDS)


# Water/land images only, group follows background 95% of the time, one object per image.
SPURIOUS_TRAIN = Distribution(
    name="spurious-train",
    background_weights=_weights(water=1.0, land=1.0),
    count_weights=(1.0, 0.0, 0.0),
    correlation=0.95,
)

# What the shipped models are trained on: the natural world, except that water and land are twice
# as common as other backgrounds and, on them, the shape group follows the background 90% of the
# time. Zero-shot stays good (60% of images are unbiased) while a background bias exists for the
# editing experiment to remove.
MAIN_MIX = Distribution(
    name="main-mix",
    background_weights=tuple(2.0 if bg in SPURIOUS_BACKGROUNDS else 1.0 for bg in BACKGROUNDS),
    correlation=0.9,
)

DISTRIBUTIONS: dict[str, Distribution] = {d.name: d for d in (NATURAL, SPURIOUS_TRAIN, MAIN_MIX)}


def distribution(name: str) -> Distribution:
    if name not in DISTRIBUTIONS:
        raise InvalidInput("distribution", f"unknown distribution {name!r}", suggestions=list(DISTRIBUTIONS))
    return DISTRIBUTIONS[name]


def cell_distribution(group: str, background: str) -> Distribution:
    """One cell of the balanced test set: a fixed shape group on a fixed background."""
    return Distribution(
        name=f"{group}-on-{background}",
        background_weights=_weights(**{background: 1.0}),
        count_weights=(1.0, 0.0, 0.0),
        group=group,
    )


_CELLS = {cell: cell_distribution(*cell) for cell in GROUP_CELLS}


def balanced_test_sample(index: int, seed: int = HELDOUT_SEED + 1) -> tuple[Sample, tuple[str, str]]:
    """Sample `index` of the balanced test set; cells cycle so every prefix of 4n is balanced."""
    cell = GROUP_CELLS[index % len(GROUP_CELLS)]
    return sample(_CELLS[cell], seed, index), cell
