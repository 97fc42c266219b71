"""The testbed's vocabulary, its concept categories, and the ONE model-aware vocabulary rule.

Every world word (factor values, plurals, count words, group words) is a concept, grouped by the
factor it names. Distractors let an explanation land outside the world's factors, but only words
the testbed text tower actually learnt are used: the caption generator's own non-factor words
("photo", "object", "shape", "wall", ...). Common English words the tower never saw (the old
200 distractors) are encoded from untrained token embeddings, sit close to every direction after
centring, and took the top-1 slot of 29 % of explanations (issue 18); they stay available as
``testbed_vocabulary(english=200)`` for measurements only.

``vocabulary_for(model, setting)`` is the rule every entry point (CLI, adapt, server, workers)
calls: shipped testbed models -> their world's words, other models -> None (the engine's English
default), unless ``setting`` ("default", "testbed" or a word-list file) says otherwise.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from sith.testbed.factors import BACKGROUNDS, COLOURS, COUNT_WORDS, PLURALS, POSITIONS, SHAPE_GROUPS, SHAPES, SIZES, TEXTURES

DEFAULT_DISTRACTORS = 0  # English (unlearnt) distractors in the default testbed vocabulary
MEASURED_DISTRACTORS = 200  # the pre-issue-18 vocabulary: world words + 200 English words
TESTBED_MODELS = ("testbed-main", "testbed-small", "testbed-siglip", "testbed-timm", "testbed-hf-clip")
SETTINGS = ("default", "testbed")
_TOKEN = re.compile(r"[a-z]+")
# Caption words that carry no content (articles, prepositions, copulas): not useful as concepts.
_FUNCTION_WORDS = frozenset("a an the of on in at over against to is are there with some one".split())


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


def world_words() -> list[str]:
    """Every word that names a factor value, in category order."""
    return list(dict.fromkeys(w for words in testbed_categories().values() for w in words))


def word_values() -> dict[str, tuple[str, str]]:
    """World word -> (factor, value) with values as in ``FACTORS`` ("circles" -> ("shape", "circle"),
    "two" -> ("count", "2"))."""
    table: dict[str, tuple[str, str]] = {}
    for shape in SHAPES:
        table[shape] = table[PLURALS[shape]] = ("shape", shape)
    for factor, values in (("colour", COLOURS), ("background", BACKGROUNDS), ("texture", TEXTURES),
                           ("size", SIZES), ("position", POSITIONS), ("group", SHAPE_GROUPS)):
        for value in values:
            table[value] = (factor, value)
    for count, word in COUNT_WORDS.items():
        table[word] = ("count", str(count))
    return table


@functools.lru_cache(maxsize=1)
def learnt_distractors(samples: int = 4000) -> list[str]:
    """Content words of the caption generator that name no factor value: the text tower was trained
    on them, so they are meaningful distractors. Found by generating captions (deterministic)."""
    import numpy as np

    from sith.testbed.captions import caption
    from sith.testbed.world import NATURAL, sample_scene

    world = set(world_words())
    seen: dict[str, None] = {}
    for i in range(samples):
        rng = np.random.default_rng([7, i])
        for word in _TOKEN.findall(caption(sample_scene(NATURAL, rng), rng)):
            if word not in world and word not in _FUNCTION_WORDS:
                seen.setdefault(word, None)
    return sorted(seen)


def testbed_vocabulary(english: int = DEFAULT_DISTRACTORS, learnt: bool = True) -> list[str]:
    """World words, then the learnt caption distractors (``learnt``), then ``english`` frequent
    English words the tower never saw (0 by default; 200 reproduces the pre-issue-18 vocabulary)."""
    words = world_words()
    if learnt:
        words += [w for w in learnt_distractors() if w not in words]
    if english > 0:
        from sith.engine.dictionary import default_vocabulary

        seen = set(words)
        words += [w for w in default_vocabulary(english + 200) if w not in seen][:english]
    return words


def concepts_for(setting: str) -> list[str] | None:
    """A concept list by name, as the CLI's ``--dictionary``/``--vocabulary`` and ``SITH_VOCABULARY``
    take it: "testbed" (world words + learnt distractors), "default" (None: the engine's built-in
    English vocabulary) or a word-list file (``read_vocabulary`` rules)."""
    from sith.engine.dictionary import read_vocabulary

    if setting == "testbed":
        return testbed_vocabulary()
    if setting == "default":
        return None
    return read_vocabulary(setting)


def is_testbed(loaded_or_name) -> bool:
    """A shipped testbed model, or one derived from it.

    By reference: None, "" and "default" name the embedded testbed model (as in
    ``sith.engine.models.load_reference``), and any name or path whose last part starts with
    "testbed-". A loaded model also counts when its text tower is a shipped testbed model's: edits
    only touch the vision tower, so an edited export saved as "red-free.safetensors" still speaks
    the world's words.
    """
    if loaded_or_name is None:
        return True
    if isinstance(loaded_or_name, (str, Path)):
        text = str(loaded_or_name).strip()
        return text in ("", "default") or Path(text.rstrip("/")).name.startswith("testbed-")
    name = getattr(loaded_or_name, "name", None)
    if name is not None and is_testbed(str(name)) and str(name).strip():
        return True
    model = getattr(loaded_or_name, "model", None)
    return model is not None and _shares_a_testbed_text_tower(model)


def _text_signature(model) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.startswith("visual."))


@functools.lru_cache(maxsize=1)
def _shipped_text_towers() -> dict[tuple, str]:
    """Text-tower signature (parameter names and shapes) -> text hash, per shipped testbed model."""
    from sith.engine.errors import InvalidInput
    from sith.engine.models import load_reference, text_hash

    towers = {}
    for name in TESTBED_MODELS:
        try:
            shipped = load_reference(name)
        except InvalidInput:  # not installed: nothing to compare with
            continue
        towers.setdefault(_text_signature(shipped.model), set()).add(text_hash(shipped.model))
    return towers


def _shares_a_testbed_text_tower(model) -> bool:
    """Hash only when the shapes match a shipped testbed text tower (cheap for every other model)."""
    from sith.engine.models import text_hash

    hashes = _shipped_text_towers().get(_text_signature(model))
    return bool(hashes) and text_hash(model) in hashes


def vocabulary_for(loaded_or_name, setting: str | None = None) -> list[str] | None:
    """The ONE model-aware vocabulary rule (see the module docstring).

    ``setting`` None or "auto": the model decides (testbed -> world words, else None = English
    default); "default", "testbed" or a file path: as ``concepts_for``.
    """
    if setting is not None and str(setting).strip() and str(setting).strip().lower() != "auto":
        return concepts_for(str(setting).strip())
    return testbed_vocabulary() if is_testbed(loaded_or_name) else None


def in_world(concept: str) -> bool:
    """Whether a concept names a value of the synthetic world (tables mark these)."""
    return concept in _world_set()


@functools.lru_cache(maxsize=1)
def _world_set() -> frozenset[str]:
    return frozenset(world_words())
