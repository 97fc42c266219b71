"""The one model-aware vocabulary rule, learnt distractors, world marking and typo suggestions."""

from __future__ import annotations

import pytest

from sith.engine.dictionary import closest_words, edit_distance
from sith.engine.errors import InvalidInput
from sith.testbed import vocabulary as v


@pytest.mark.parametrize("name", ["testbed-main", "testbed-small", "sith/testbed/checkpoints/testbed-main/",
                                  "testbed-main-red-free", None, "", "default"])
def test_testbed_models_get_their_world(name) -> None:
    words = v.vocabulary_for(name)
    assert words == v.testbed_vocabulary()
    assert set(v.world_words()) <= set(words)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14/laion2b_s32b_b82k", "hf-hub:org/model", "/tmp/my-clip"])
def test_other_models_get_the_english_default(name) -> None:
    assert v.vocabulary_for(name) is None


def test_loaded_models_are_judged_by_name() -> None:
    class Loaded:
        def __init__(self, name: str) -> None:
            self.name = name

    assert v.vocabulary_for(Loaded("testbed-small")) == v.testbed_vocabulary()
    assert v.vocabulary_for(Loaded("ViT-B-32")) is None


def test_the_user_setting_wins(tmp_path) -> None:
    assert v.vocabulary_for("testbed-main", "default") is None
    assert v.vocabulary_for("ViT-B-32", "testbed") == v.testbed_vocabulary()
    path = tmp_path / "words.txt"
    path.write_text("red\n# comment\nblue\nred\n")
    assert v.vocabulary_for("testbed-main", str(path)) == ["red", "blue"]
    assert v.vocabulary_for("ViT-B-32", "auto") is None
    with pytest.raises(InvalidInput) as info:
        v.vocabulary_for("ViT-B-32", str(tmp_path / "missing.txt"))
    assert info.value.field == "dictionary"


def test_default_testbed_vocabulary_has_only_learnt_distractors() -> None:
    from sith.testbed.captions import PREFIXES

    words = v.testbed_vocabulary()
    extra = [w for w in words if not v.in_world(w)]
    assert extra == v.learnt_distractors() and extra  # every non-world word comes from the captions
    prefix_words = {w for p in PREFIXES for w in p.split()}
    assert {"photo", "image", "picture", "rendering"} <= prefix_words & set(extra)
    assert not set(extra) & set(v.world_words())
    assert len(v.testbed_vocabulary(english=200)) == len(words) + 200


def test_word_values_map_plurals_and_counts() -> None:
    table = v.word_values()
    assert table["circles"] == ("shape", "circle") and table["two"] == ("count", "2")
    assert table["water"] == ("background", "water") and "photo" not in table


def test_edit_distance_counts_a_transposition_once() -> None:
    assert edit_distance("rde", "red") == 1
    assert edit_distance("rde", "order") == 2
    assert edit_distance("", "abc") == 3 and edit_distance("same", "same") == 0


def test_closest_suggests_the_typo_fix_first() -> None:
    words = v.testbed_vocabulary(english=200)
    assert "order" in words
    suggestions = closest_words("rde", words)
    assert suggestions[0] == "red"
    assert closest_words("bleu", words)[0] == "blue"
    assert closest_words("", words) == []


def test_an_edited_testbed_export_keeps_the_world_vocabulary() -> None:
    """Edits touch only the vision tower: a renamed, edited testbed model still gets its world's words,
    while a model whose text tower differs does not."""
    import dataclasses

    import torch

    from sith.engine.models import load_reference

    shipped = load_reference("testbed-small")
    with torch.no_grad():
        shipped.model.visual.proj.mul_(0.5)  # an "edit"
    edited = dataclasses.replace(shipped, name="red-free")
    assert v.vocabulary_for(edited) == v.testbed_vocabulary()
    with torch.no_grad():
        shipped.model.text_projection.add_(0.01)  # a different text tower
    assert v.vocabulary_for(dataclasses.replace(shipped, name="red-free")) is None
