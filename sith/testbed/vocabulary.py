"""The testbed's shared vocabulary and concept categories (ground truth for 'what a head encodes').

Every world word (factor values, plurals, count words, group words) is a concept, grouped by the
factor it names; common English words from the default vocabulary are added as distractors, so an
explanation *can* land outside the world's factors and a specialisation is not guaranteed.
"""

from __future__ import annotations

from sith.testbed.factors import BACKGROUNDS, COLOURS, COUNT_WORDS, PLURALS, POSITIONS, SHAPE_GROUPS, SHAPES, SIZES, TEXTURES

DEFAULT_DISTRACTORS = 200


def testbed_categories() -> dict[str, list[str]]:
    """Factor -> the concepts that name it."""
    return {
        "shape": [w for s in SHAPES for w in (s, PLURALS[s])],
        "colour": list(COLOURS),
        "background": list(BACKGROUNDS),
        "texture": list(TEXTURES),
        "size": list(SIZES),
        "position": list(POSITIONS),
        "count": list(COUNT_WORDS.values()),
        "group": list(SHAPE_GROUPS),
    }


def concepts_for(setting: str) -> list[str] | None:
    """A concept list by name, as the CLI's ``--dictionary``/``--vocabulary`` and ``SITH_VOCABULARY``
    take it: "testbed" (world words + distractors), "default" (None: the engine's built-in English
    vocabulary) or a word-list file (``read_vocabulary`` rules)."""
    from sith.engine.dictionary import read_vocabulary

    if setting == "testbed":
        return testbed_vocabulary()
    if setting == "default":
        return None
    return read_vocabulary(setting)


def testbed_vocabulary(distractors: int = DEFAULT_DISTRACTORS) -> list[str]:
    """World words first, then ``distractors`` frequent English words (deterministic)."""
    world = list(dict.fromkeys(w for words in testbed_categories().values() for w in words))
    if distractors <= 0:
        return world
    from sith.engine.dictionary import default_vocabulary

    seen = set(world)
    extra = [w for w in default_vocabulary(distractors + 200) if w not in seen][:distractors]
    return world + extra
