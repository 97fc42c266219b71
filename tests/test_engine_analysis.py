"""Analyzer: explanations, head themes, concept search and artifact caching on a tiny random CLIP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sith.engine.analysis import Analyzer
from sith.engine.cache import MemoryCache
from sith.engine.decomposition import decompose_layer
from sith.engine.dictionary import build_dictionary
from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel
from sith.engine.sparse import comp

from analysis_fixtures import analysis_model

WORDS = [
    "red", "blue", "green", "yellow", "dog", "cat", "horse", "bird", "car", "boat", "train", "plane",
    "beach", "forest", "city", "mountain", "kitchen", "street", "metal", "wood", "glass", "paper",
    "leather", "cotton", "man", "woman", "child", "crowd", "letter", "number", "circle", "square",
    "snow", "rain", "sun", "night", "fire", "water", "stone", "grass",
]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return analysis_model()


@pytest.fixture(scope="module")
def dictionary(loaded, tmp_path_factory):
    return build_dictionary(loaded, WORDS, cache_dir=tmp_path_factory.mktemp("dictionaries"))


@pytest.fixture(scope="module")
def analyzer(loaded, dictionary) -> Analyzer:
    return Analyzer(loaded, dictionary)


def test_targets_are_mapped_right_singular_vectors_head_major(analyzer, loaded) -> None:
    block = loaded.model.visual.transformer.resblocks[1]
    svd = decompose_layer(block, loaded.info.heads, 1)
    head, j = 2, 5
    expected = analyzer.joint.map(svd.V[head, :, j][None])[0]
    torch.testing.assert_close(analyzer.targets(1)[head * svd.S.shape[1] + j], expected)


def test_explain_shapes_and_order(analyzer, loaded) -> None:
    summaries = analyzer.explain(layers=[-1, 1], heads=[0, 3], k=4, vectors=6, with_fidelity=True)
    assert [(s.layer, s.head) for s in summaries] == [(1, 0), (1, 3), (2, 0), (2, 3)]
    for summary in summaries:
        sigmas = [v.sigma for v in summary.vectors]
        assert len(sigmas) == 6 and sigmas == sorted(sigmas, reverse=True)
        for v in summary.vectors:
            coefs = [c for _, c in v.concepts]
            assert 0 < len(coefs) <= 4 and all(c > 0 for c in coefs) and coefs == sorted(coefs, reverse=True)
            assert all(name in WORDS for name, _ in v.concepts)
            assert -1.0 <= v.fidelity <= 1.0


def test_explanations_are_the_comp_codes_of_the_targets(analyzer, dictionary) -> None:
    summary = analyzer.explain(layers=[2], heads=[1], method="comp", k=3, coherence=0.2, vectors=2)[0]
    rank = analyzer.decomposition([2])[2].S.shape[1]
    codes = comp(analyzer.targets(2)[rank : rank + 2], dictionary.centred, k=3, coherence=0.2)
    for v, indices, coefficients in zip(summary.vectors, codes.indices, codes.coefficients):
        expected = [(dictionary.concepts[i], c) for i, c in zip(indices.tolist(), coefficients.tolist()) if c > 0]
        assert [n for n, _ in v.concepts] == [n for n, _ in expected]
        assert [c for _, c in v.concepts] == pytest.approx([c for _, c in expected], abs=1e-5)


def test_theme_is_sigma_weighted_coefficient_mass(analyzer, dictionary) -> None:
    summary = analyzer.explain(layers=[2], heads=[0], theme_size=3)[0]
    svd = analyzer.decomposition([2])[2]
    rank = svd.S.shape[1]
    codes = analyzer.codes(2)
    dense = codes.dense(len(dictionary))[:rank]  # head 0's vectors
    scores = (svd.S[0][:, None] * dense).sum(0) / svd.S[0].sum()
    best = scores.topk(3)
    assert [name for name, _ in summary.theme] == [dictionary.concepts[i] for i in best.indices.tolist()]
    assert [s for _, s in summary.theme] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_find_ranks_by_coefficient_plus_cosine(analyzer, dictionary) -> None:
    hits = analyzer.find(["dog", "boat"], layers=[1, 2], top=None)
    assert len(hits) == 2 * 4 * 16  # every vector of both layers
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    queries = dictionary.centred[[dictionary.index("dog"), dictionary.index("boat")]]
    for hit in hits[:10] + hits[-3:]:
        rank = analyzer.decomposition([hit.layer])[hit.layer].S.shape[1]
        row = hit.head * rank + hit.index
        codes = analyzer.codes(hit.layer)
        cos = analyzer.coding_targets(hit.layer)[row] @ queries.T
        coef = torch.stack([codes.coefficients[row][codes.indices[row] == dictionary.index(c)].sum()
                            for c in ("dog", "boat")])
        total = coef + cos
        assert hit.score == pytest.approx(float(total.max()), abs=1e-5)
        assert hit.matched == ("dog", "boat")[int(total.argmax())]
        assert hit.coefficient + hit.cosine == pytest.approx(hit.score, abs=1e-5)


def test_find_puts_vectors_that_name_the_concept_first(analyzer, dictionary) -> None:
    codes = analyzer.codes(2)
    concept = dictionary.concepts[int(codes.indices[0, 0])]  # the top concept of head 0, vector 0
    hit = analyzer.find([concept], layers=[2], top=1)[0]
    assert hit.coefficient > 0 and hit.matched == concept
    assert analyzer.find([concept], layers=[2], top=5) == analyzer.find([concept], layers=[2], top=5)


def test_unknown_concept_suggests_close_matches(analyzer) -> None:
    with pytest.raises(InvalidInput) as info:
        analyzer.find(["red", "dgo"])
    assert info.value.field == "concepts[1]"
    assert "dog" in info.value.suggestions


def test_free_text_is_scored_by_cosine(analyzer, loaded, dictionary) -> None:
    from sith.engine.dictionary import encode_texts

    hit = analyzer.find(["a red sports car"], layers=[2], top=1, free_text=True)[0]
    embedding = F.normalize(encode_texts(loaded, ["a red sports car"]), dim=-1)
    query = F.normalize(embedding - dictionary.embeddings.mean(0, keepdim=True), dim=-1)[0]
    best = (analyzer.coding_targets(2) @ query).max()
    assert hit.coefficient == 0.0
    assert hit.score == pytest.approx(float(best), abs=1e-5)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda a: a.explain(layers=[7]), "layers"),
        (lambda a: a.explain(heads=[4]), "heads"),
        (lambda a: a.explain(k=0), "k"),
        (lambda a: a.explain(coherence=-1.0), "coherence"),
        (lambda a: a.explain(method="lasso"), "method"),
        (lambda a: a.explain(vectors=-1), "vectors"),
        (lambda a: a.find([]), "concepts"),
        (lambda a: a.find(["red"], top=0), "top"),
    ],
)
def test_bad_input_names_the_field(analyzer, call, field) -> None:
    with pytest.raises(InvalidInput) as info:
        call(analyzer)
    assert info.value.field == field


def test_dictionary_of_another_width_is_rejected(loaded, dictionary) -> None:
    from dataclasses import replace

    wrong = replace(dictionary, centred=dictionary.centred[:, :16], embeddings=dictionary.embeddings[:, :16])
    with pytest.raises(InvalidInput) as info:
        Analyzer(loaded, wrong)
    assert info.value.field == "dictionary"


def test_cache_memoises_by_content_key(loaded, dictionary) -> None:
    from sith.engine.cache import tensors_from_bytes, tensors_to_bytes

    cache = MemoryCache()
    first = Analyzer(loaded, dictionary, cache=cache).explain(layers=[2], k=3)
    # the SVDs of all 3 layers (the default "specific" coder standardises over the whole tower),
    # the data-free image mean, the shared directions, the per-atom statistics and the codes
    assert len(cache) == 7
    # Double the cached coefficients: a fresh analyzer must serve them instead of recomputing.
    key = next(k for k in cache._items if "/codes-" in k)
    tensors = tensors_from_bytes(cache.get(key))
    cache.put(key, tensors_to_bytes({**tensors, "coefficients": 2 * tensors["coefficients"]}))
    again = Analyzer(loaded, dictionary, cache=cache).explain(layers=[2], k=3)
    assert len(cache) == 7
    first_coefs = [c for s in first for v in s.vectors for _, c in v.concepts]
    again_coefs = [c for s in again for v in s.vectors for _, c in v.concepts]
    assert again_coefs == pytest.approx([2 * c for c in first_coefs], abs=3e-6)
    other = Analyzer(loaded, dictionary, cache=cache)
    other.explain(layers=[2], k=4)  # new k -> new codes key
    other.explain(layers=[2], k=3, method="topk")  # new method -> new key
    Analyzer(loaded, dictionary, image_mean="none", cache=cache).explain(layers=[2], k=3)  # new image mean
    assert len([k for k in cache._items if "/codes-" in k]) == 4


def test_default_method_is_specific_coding_over_the_tower(analyzer, dictionary, loaded) -> None:
    from sith.engine.analysis import remove_shared
    from sith.engine.sparse import DEFAULT_METHOD, atom_statistics, specific_codes

    assert DEFAULT_METHOD == "specific"
    layers = range(loaded.info.layers)
    population = torch.cat([analyzer.targets(l) for l in layers] + [analyzer._negative_targets(l) for l in layers])
    stats = atom_statistics(remove_shared(population, analyzer.shared_basis()), dictionary.centred)
    torch.testing.assert_close(analyzer.atom_stats()[0], stats[0])
    expected = specific_codes("topk", analyzer.coding_targets(1), dictionary.centred, stats, k=4)
    got = analyzer.codes(1, k=4)
    assert torch.equal(got.indices, expected.indices)


def test_explanations_carry_a_bounded_confidence(analyzer) -> None:
    summaries = analyzer.explain(layers=[2], vectors=4)
    values = [v.confidence for s in summaries for v in s.vectors]
    assert values and all(c is not None and 0.0 <= c <= 1.0 for c in values)
    hit = analyzer.find(["dog"], layers=[2], top=1)[0]
    assert hit.confidence is not None and 0.0 <= hit.confidence <= 1.0


def test_confidence_is_monotone_in_every_feature() -> None:
    from sith.engine.analysis import CONFIDENCE_WEIGHTS, explanation_confidence

    assert all(w >= 0 for w in CONFIDENCE_WEIGHTS)
    base = torch.tensor([[0.3, 1.0, 0.2, 0.05]])
    start = float(explanation_confidence(base)[0])
    for i in range(4):
        bumped = base.clone()
        bumped[0, i] += 0.5
        assert float(explanation_confidence(bumped)[0]) >= start
    extreme = explanation_confidence(torch.tensor([[100.0, 100.0, 100.0, 100.0], [-100.0, -100.0, -100.0, -100.0]]))
    assert bool(((extreme >= 0) & (extreme <= 1)).all())


def test_explanation_features_are_those_of_the_first_concept(analyzer, dictionary) -> None:
    from sith.engine.analysis import explanation_features

    codes = analyzer.codes(2, method="comp", k=3)
    targets = analyzer.coding_targets(2)
    feats = explanation_features(codes, targets, dictionary.centred, analyzer.atom_stats())
    cos = targets @ dictionary.centred.T
    first = codes.indices[:, 0]
    torch.testing.assert_close(feats[:, 0], codes.coefficients[:, 0])
    torch.testing.assert_close(feats[:, 2], cos.gather(1, first[:, None])[:, 0])
    mean, scale = analyzer.atom_stats()
    torch.testing.assert_close(feats[:, 1], (feats[:, 2] - mean[first]) / scale[first])
    assert bool((feats[:, 3] <= feats[:, 2] + 2).all())


def test_coding_targets_drop_the_towers_shared_directions(analyzer, loaded, dictionary) -> None:
    from sith.engine.analysis import DEFAULT_SHARED_DIRECTIONS, shared_directions

    layers = range(loaded.info.layers)
    population = torch.cat([analyzer.targets(l) for l in layers] + [analyzer._negative_targets(l) for l in layers])
    basis = analyzer.shared_basis()
    assert basis.shape == (DEFAULT_SHARED_DIRECTIONS, loaded.info.output_dim) == (2, loaded.info.output_dim)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    # The basis spans the top principal directions of the centred population.
    centred = population.double() - population.double().mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[:2].float()
    torch.testing.assert_close((top @ basis.T).abs().sum(dim=1), torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(shared_directions(population, 2), basis, atol=1e-5, rtol=0)
    coded = analyzer.coding_targets(1)
    torch.testing.assert_close(coded @ basis.T, torch.zeros(coded.shape[0], 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(coded.norm(dim=1), torch.ones(coded.shape[0]))
    expected = F.normalize(analyzer.targets(1) - (analyzer.targets(1) @ basis.T) @ basis, dim=-1)
    torch.testing.assert_close(coded, expected)


def test_shared_zero_codes_the_papers_mapped_directions(loaded, dictionary) -> None:
    from sith.engine.sparse import encode

    plain = Analyzer(loaded, dictionary, shared=0, cache=MemoryCache())
    assert plain.shared_basis().shape[0] == 0
    torch.testing.assert_close(plain.coding_targets(2), plain.targets(2))
    # The paper's coders always code the plain mapped directions.
    shared = Analyzer(loaded, dictionary, cache=MemoryCache())
    for method in ("comp", "nnomp", "topk", "mp"):
        assert shared.coding_targets(2, method) is shared.targets(2)
    expected = encode("comp", plain.targets(2), dictionary.centred, k=3)
    assert torch.equal(shared.codes(2, "comp", k=3).indices, expected.indices)
    # specific codes under different shared counts never share a cache entry.
    cache = MemoryCache()
    Analyzer(loaded, dictionary, shared=0, cache=cache).codes(2, k=3)
    Analyzer(loaded, dictionary, shared=2, cache=cache).codes(2, k=3)
    assert len([k for k in cache._items if "/codes-" in k]) == 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", 10_000])
def test_shared_must_be_a_small_non_negative_integer(loaded, dictionary, bad) -> None:
    with pytest.raises(InvalidInput) as info:
        Analyzer(loaded, dictionary, shared=bad)
    assert info.value.field == "shared"
