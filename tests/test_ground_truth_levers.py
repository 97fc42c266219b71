"""experiments/ground_truth_levers.py and the harness's shared-direction map: grammar prompt
ensembles, per-factor centring, factor-first calibration, and the default map on a tiny CLIP."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import ground_truth as harness  # noqa: E402
import ground_truth_levers as levers  # noqa: E402

from analysis_fixtures import analysis_model  # noqa: E402
from sith.engine.models import LoadedModel  # noqa: E402
from sith.testbed.factors import BACKGROUND_PHRASES, COLOURS  # noqa: E402
from sith.testbed import vocabulary as tb_vocabulary  # noqa: E402


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return analysis_model()


def test_grammar_prompts_name_the_word_and_share_contexts_across_a_factor() -> None:
    red, blue = levers.grammar_prompts("red", n=30), levers.grammar_prompts("blue", n=30)
    assert len(red) == 30 and all(" red " in f" {s} " for s in red)
    # Same contexts for every value of a factor: swapping the word gives the other value's sentences.
    assert [f" {s} ".replace(" red ", " blue ").strip() for s in red] == blue
    others = {c for s in red for c in COLOURS if c != "red" and f" {c} " in f" {s} "}
    assert not others  # the factor itself is never varied
    water = levers.grammar_prompts("water", n=30)
    assert all(any(p in s for p in BACKGROUND_PHRASES["water"]) for s in water)
    assert len(set(water)) > 10  # the other factors vary
    assert all(" circles" in s for s in levers.grammar_prompts("circles", n=10))
    assert levers.grammar_prompts("photo") is None  # a learnt distractor names no factor value
    assert levers.grammar_prompts("red", n=5) == levers.grammar_prompts("red", n=5)  # deterministic


def test_every_world_word_gets_grammar_sentences() -> None:
    for word in tb_vocabulary.testbed_vocabulary():
        sentences = levers.grammar_prompts(word, n=3)
        assert (sentences is None) == (word not in tb_vocabulary.word_values())


def test_centred_atoms_globally_and_per_factor() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    groups = ["a", "a", "a", "b", "b", "c"]
    per = levers.centred_atoms(emb, groups)
    torch.testing.assert_close(per.norm(dim=1)[:5], torch.ones(5))
    # Within a group the unnormalised rows sum to zero: the centred rows are linearly dependent.
    assert float(torch.linalg.svdvals(per[:3])[-1]) < 1e-5
    glob = levers.centred_atoms(emb)
    torch.testing.assert_close(glob, F.normalize(emb - emb.mean(0), dim=-1))
    assert levers.word_groups(["red", "circles", "photo"]) == ["colour", "shape", "other"]


def test_factor_first_names_the_best_word_of_the_chosen_factor() -> None:
    words = ["red", "blue", "water", "land", "circle", "square"]
    atoms = torch.eye(6, 8)
    gen = torch.Generator().manual_seed(1)
    population = F.normalize(torch.randn(200, 8, generator=gen), dim=-1)
    pos = F.normalize(atoms[2] * 3 + atoms[0] * 1 + 0.01, dim=0)[None]  # mostly "water"
    top_pos, top_neg = levers.factor_first(pos, -pos, population, atoms, words, both_poles=False)
    assert top_pos == ["water"]
    assert top_neg[0] in words


def test_shared_removed_map_is_orthogonal_to_the_towers_top_directions(loaded, tmp_path) -> None:
    from sith.engine.analysis import shared_directions
    from sith.engine.decomposition import decompose_layer
    from sith.engine.jointspace import JointSpace, poles_mean

    poles = JointSpace.for_model(loaded, poles_mean(loaded)).map
    mapping = harness.shared_removed(loaded, poles, 2)
    blocks = loaded.model.visual.transformer.resblocks
    every = torch.cat([decompose_layer(b, loaded.info.heads, i).V.transpose(1, 2).reshape(-1, loaded.info.width)
                       for i, b in enumerate(blocks)]).float()
    basis = shared_directions(torch.cat([poles(every), poles(-every)]), 2)
    out = mapping(every[:10])
    torch.testing.assert_close(out @ basis.T, torch.zeros(10, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(10))
    # The engine's coding targets for the default coder are the same directions.
    from sith.engine.analysis import Analyzer
    from sith.engine.dictionary import build_dictionary

    dictionary = build_dictionary(loaded, ["red", "blue", "water", "land", "circle"], cache_dir=tmp_path)
    analyzer = Analyzer(loaded, dictionary)
    v = analyzer.decomposition([1])[1].V
    flat = v.transpose(1, 2).reshape(-1, v.shape[1]).float()
    torch.testing.assert_close(analyzer.coding_targets(1), mapping(flat), atol=1e-5, rtol=0)

