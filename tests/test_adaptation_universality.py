"""Cross-model head matching over concept profiles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaptation_fixtures import TINY_CFG, save_and_load, tiny_clip
from edits_fixtures import CONCEPTS
from sith.adaptation.universality import (
    HeadProfiles,
    category_shares,
    head_profiles,
    match_profiles,
    null_scores,
    specialisation,
)
from sith.engine.analysis import Analyzer
from sith.engine.dictionary import build_dictionary
from sith.engine.errors import InvalidInput

CATEGORIES = {"colour": ["red", "blue", "green", "yellow"], "shape": ["circle", "square", "triangle", "star"],
              "background": ["water", "land", "snow", "forest"]}


def _profiles(rows: list[list[float]], heads=None) -> HeadProfiles:
    t = torch.tensor(rows, dtype=torch.float32)
    return HeadProfiles(heads=heads or [(0, i) for i in range(len(rows))], profiles=t, concepts=CONCEPTS[: t.shape[1]])


def test_hungarian_recovers_a_permutation_of_noisy_profiles():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 12, generator=g) ** 4  # peaky, like real profiles
    perm = [3, 0, 5, 1, 4, 2]
    b = a[perm] + 0.02 * torch.rand(6, 12, generator=g)
    matches, sim = match_profiles(_profiles(a.tolist()), _profiles(b.tolist()))
    found = {m.a[1]: m.b[1] for m in matches}
    assert found == {perm[j]: j for j in range(6)}
    assert all(m.mutual for m in matches) and sim.shape == (6, 6)
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)


def test_categories_and_specialisation():
    a = torch.zeros(2, 12)
    a[0, CONCEPTS.index("red")] = 0.3
    a[0, CONCEPTS.index("blue")] = 0.5
    a[0, CONCEPTS.index("water")] = 0.2
    a[1, CONCEPTS.index("square")] = 0.4
    a[1, CONCEPTS.index("snow")] = 0.4
    profiles = _profiles(a.tolist())
    names, shares = category_shares(profiles, CATEGORIES)
    assert shares[0, names.index("colour")] == pytest.approx(0.8)
    assert specialisation(shares, names) == ["colour", "shape"]  # 0.5 of the in-category mass is enough
    assert specialisation(shares * 0.3, names) == ["colour", "shape"]  # distractor mass does not count
    assert specialisation(shares, names, threshold=0.6) == ["colour", None]


def test_vocabularies_must_agree():
    a = _profiles([[1.0, 0.0]])
    b = HeadProfiles(heads=[(0, 0)], profiles=torch.tensor([[1.0, 0.0]]), concepts=["x", "y"])
    with pytest.raises(InvalidInput) as info:
        match_profiles(a, b)
    assert info.value.field == "dictionary"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    small_cfg = copy.deepcopy(TINY_CFG)
    small_cfg["vision_cfg"].update(width=48, layers=2, head_width=12)
    small_cfg["embed_dim"] = 24
    torch.manual_seed(9)
    import open_clip
    small = open_clip.model.CLIP(**small_cfg).eval()
    return (save_and_load(tiny_clip(0), TINY_CFG, folder, "a"), save_and_load(small, small_cfg, folder, "b"))


def test_profiles_are_the_analyzer_theme_scores(models, tmp_path):
    a, _ = models
    analyzer = Analyzer(a, build_dictionary(a, CONCEPTS, cache_dir=tmp_path))
    profiles = head_profiles(analyzer, layers=[-1])
    assert profiles.profiles.shape == (a.info.heads, len(CONCEPTS))
    theme = analyzer.explain(layers=[-1], heads=[1], theme_size=3)[0].theme
    row = profiles.profiles[profiles.heads.index((a.info.layers - 1, 1))]
    for concept, score in theme:
        assert float(row[CONCEPTS.index(concept)]) == pytest.approx(score, abs=1e-5)


def test_a_model_matches_itself_and_beats_the_null(models, tmp_path):
    a, b = models
    pa = head_profiles(Analyzer(a, build_dictionary(a, CONCEPTS, cache_dir=tmp_path)), layers=None)
    pb = head_profiles(Analyzer(b, build_dictionary(b, CONCEPTS, cache_dir=tmp_path)), layers=None)
    self_matches, _ = match_profiles(pa, pa)
    assert all(m.a == m.b and m.score == pytest.approx(1.0) for m in self_matches)
    assert np.mean([m.score for m in self_matches]) > null_scores(pa, pa, permutations=10).max()
    cross, sim = match_profiles(pa, pb)
    assert sim.shape == (len(pa.heads), len(pb.heads))
    assert len(cross) == min(sim.shape)  # rectangular: every head of the smaller model is used once
    assert len({m.b for m in cross}) == len(cross)
