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
    theme = analyzer.explain(layers=[-1], heads=[1], theme_size=3, method="comp")[0].theme  # profiles use COMP
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


# ------------------------------------------------------------------ chance baselines (issue 17)

from sith.adaptation.universality import (  # noqa: E402
    _eta_squared,
    ground_truth_eta2,
    head_cls_writes,
    label_agreement,
    permutation_p,
    untrained_vision_control,
    usage_permutation,
)


def _shared_usage(seed: int, n_heads: int = 12, n_concepts: int = 20) -> torch.Tensor:
    """Profiles whose mass sits on the same few concepts in every head (like world words), with
    nothing head-specific: what any two models trained on one world share."""
    g = torch.Generator().manual_seed(seed)
    usage = torch.tensor([8.0, 6.0, 5.0, 4.0] + [0.3] * (n_concepts - 4))
    return usage * torch.rand(n_heads, n_concepts, generator=g)


def test_usage_permutation_keeps_each_concepts_usage_and_the_label_shuffle_does_not():
    profiles = _shared_usage(0).numpy()
    rng = np.random.default_rng(0)
    shuffled = usage_permutation(profiles, rng)
    # every concept keeps its values (so its total use), only their heads move
    assert np.allclose(np.sort(shuffled, axis=0), np.sort(profiles, axis=0))
    assert np.allclose(shuffled.sum(0), profiles.sum(0))
    assert not np.allclose(shuffled, profiles)
    label_shuffled = profiles[:, rng.permutation(profiles.shape[1])]  # the pre-issue-17 null
    assert not np.allclose(label_shuffled.sum(0), profiles.sum(0))


def test_shared_usage_alone_is_not_significant_under_the_usage_null():
    """Independent model pairs that share only concept usage: the old null rejects every time, the
    usage-preserving one behaves like a valid test (p-values spread over (0, 1])."""
    usage_p, label_p, gaps = [], [], []
    for pair in range(8):
        a, b = _profiles(_shared_usage(10 + 2 * pair).tolist()), _profiles(_shared_usage(11 + 2 * pair).tolist())
        observed = float(np.mean([m.score for m in match_profiles(a, b)[0]]))
        usage = null_scores(a, b, permutations=100, seed=pair)
        labels = null_scores(a, b, permutations=100, seed=pair, kind="labels")
        usage_p.append(permutation_p(observed, usage))
        label_p.append(permutation_p(observed, labels))
        gaps.append(usage.mean() - labels.mean())
    assert max(label_p) < 0.02  # the pre-issue-17 null calls unrelated models "universal"
    assert np.median(usage_p) > 0.2 and sum(p < 0.05 for p in usage_p) <= 2
    assert min(gaps) > 0.1


def test_p_value_is_in_unit_interval_and_small_for_identical_models():
    a = _profiles(_shared_usage(3).tolist())
    null = null_scores(a, a, permutations=99, seed=1)
    p = permutation_p(1.0, null)
    assert p == pytest.approx(1 / 100) and 0 < p <= 1
    assert permutation_p(-1.0, null) == 1.0
    with pytest.raises(InvalidInput) as info:
        null_scores(a, a, permutations=0)
    assert info.value.field == "permutations"
    with pytest.raises(InvalidInput) as info:
        null_scores(a, a, kind="bogus")
    assert info.value.field == "null"


def test_label_agreement_against_a_label_preserving_chance():
    labels = ["colour", "shape", "background", "colour", "shape", "background", "size", "count"]
    pairs = [(i, i) for i in range(len(labels))]
    same = label_agreement(pairs, labels, labels, permutations=500)
    assert same["observed"] == 1.0 and same["p_value"] < 0.01 and same["chance_mean"] < 0.5
    constant = label_agreement(pairs, ["background"] * 8, ["background"] * 8, permutations=100)
    assert constant["observed"] == 1.0 and constant["p_value"] == 1.0  # nothing beyond label usage
    assert 0 <= same["p_value"] <= 1


def test_eta_squared_on_constructed_data():
    labels = torch.arange(300) % 3
    z = torch.nn.functional.one_hot(labels).float() * 5.0
    assert _eta_squared(z, labels) == pytest.approx(1.0)
    noise = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    assert _eta_squared(noise, labels) < 0.02  # bias-corrected: chance is ~0, not (k-1)/(N-1)
    many = torch.arange(300) % 30  # 30 groups: plain η² would be ~0.1 by chance
    assert _eta_squared(noise, many) < 0.03
    labels_missing = labels.clone()
    labels_missing[:100] = -1  # e.g. position of multi-object scenes: ignored
    assert _eta_squared(z, labels_missing) == pytest.approx(1.0)


def test_untrained_control_keeps_the_text_tower_and_is_reproducible(models):
    a, _ = models
    control = untrained_vision_control(a, seed=0)
    again = untrained_vision_control(a, seed=0)
    assert control.info == a.info and control.hash != a.hash and control.hash == again.hash
    assert control.name == f"{a.name}-untrained-vision"
    text_a = {k: v for k, v in a.model.state_dict().items() if not k.startswith("visual.")}
    text_c = {k: v for k, v in control.model.state_dict().items() if not k.startswith("visual.")}
    assert all(torch.equal(text_a[k], text_c[k]) for k in text_a)
    assert untrained_vision_control(a, seed=1).hash != control.hash


WORLD_CFG = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": 64, "patch_size": 16, "layers": 2}}


def test_head_writes_sum_to_the_attention_output_and_ground_truth_labels(tmp_path):
    import open_clip

    torch.manual_seed(0)
    loaded = save_and_load(open_clip.model.CLIP(**WORLD_CFG).eval(), WORLD_CFG, tmp_path, "world")
    from sith.testbed.evaluate import factor_set

    images = factor_set(20).images
    writes = head_cls_writes(loaded, images)
    block = loaded.model.visual.transformer.resblocks[1]
    seen = []
    handle = block.attn.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        loaded.model.encode_image(images)
    handle.remove()
    attn_out = seen[0] if block.attn.batch_first else seen[0].transpose(0, 1)
    assert torch.allclose(writes[1].sum(0) + block.attn.out_proj.bias, attn_out[:, 0], atol=1e-5)
    truth = ground_truth_eta2(loaded, n_images=60)
    assert truth.eta2.shape == (2 * loaded.info.heads, 7) and bool(((truth.eta2 >= 0) & (truth.eta2 <= 1)).all())
    assert set(truth.labels()) <= set(truth.factors) and len(truth.labels(relative=True)) == len(truth.heads)
    with pytest.raises(InvalidInput):
        ground_truth_eta2(loaded, n_images=3)


def test_head_writes_through_the_adapter_on_a_transformers_clip():
    """The same class-token writes on a non-open_clip tower: they sum to the attention's output row."""
    from test_engine_towers import build
    from test_engine_towers import images as tower_images

    model = build("hf-clip")
    x = tower_images(model, n=4)
    writes = head_cls_writes(model, x)
    layers = model.hf.vision_model.encoder.layers
    assert sorted(writes) == list(range(len(layers))) and writes[1].shape == (4, 4, 32)  # [H, B, d]
    seen = []
    handle = layers[1].self_attn.out_proj.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model.encode_image(x)
    handle.remove()
    assert torch.allclose(writes[1].sum(0) + layers[1].self_attn.out_proj.bias, seen[0][:, 0], atol=1e-5)


@pytest.mark.parametrize("family", ["coca", "siglip-timm"])
def test_head_writes_name_a_tower_that_does_not_read_the_class_token(family):
    from test_engine_towers import build
    from test_engine_towers import images as tower_images

    model = build(family)
    with pytest.raises(InvalidInput) as info:
        head_cls_writes(model, tower_images(model))
    assert info.value.field == "ground_truth" and "class token" in info.value.reason
    assert ("VisionTransformer" if family == "coca" else "timm") in info.value.reason


# ------------------------------------------------------------------ capacity profiles (issue 13)

from sith.adaptation.universality import (  # noqa: E402
    DEFAULT_PROFILE,
    PROFILES,
    capacity_profiles,
    category_blocks,
    category_permutation,
    concept_directions,
    write_capacity,
)
from sith.engine.decomposition import LayerSVD  # noqa: E402


@pytest.fixture()
def analyzer_a(models, tmp_path):
    a, _ = models
    return Analyzer(a, build_dictionary(a, CONCEPTS, cache_dir=tmp_path))


def test_concept_directions_are_the_edit_planners_pulled_back_directions(analyzer_a):
    from sith.edits.operators import Geometry

    g = concept_directions(analyzer_a)
    assert g.shape == (len(CONCEPTS), analyzer_a.loaded.info.width)
    geometry = Geometry(analyzer_a.joint, analyzer_a.dictionary, analyzer_a.decomposition(None))
    blue = CONCEPTS.index("blue")
    assert torch.allclose(g[blue], geometry.residual_direction("blue"))
    assert torch.allclose(g.norm(dim=1), torch.ones(len(CONCEPTS), dtype=g.dtype))
    # write_capacity is Geometry.head_coords' squared norm, for all directions at once
    layer, svd = next(iter(analyzer_a.decomposition(None).items()))
    coords = geometry.head_coords(g[blue])[layer]
    assert torch.allclose(write_capacity(svd, g)[:, blue], (coords ** 2).sum(1))


@pytest.mark.parametrize("profile", ["capacity", "relative-capacity"])
def test_capacity_profiles_are_shares_and_ignore_the_sign_of_singular_vectors(analyzer_a, profile):
    p = head_profiles(analyzer_a, layers=None, profile=profile)
    assert p.profiles.shape == (len(analyzer_a.decomposition(None)) * analyzer_a.loaded.info.heads, len(CONCEPTS))
    assert bool((p.profiles >= 0).all())
    assert torch.allclose(p.profiles.sum(1), torch.ones(len(p.heads)), atol=1e-5)
    # flip the sign of some singular vector pairs (u_j, v_j) -> (-u_j, -v_j): the same W_VO
    every = list(range(analyzer_a.loaded.info.layers))
    signs = torch.where(torch.rand(analyzer_a.loaded.info.heads, 16, generator=torch.Generator().manual_seed(1)) < 0.5,
                        -1.0, 1.0)
    for layer, svd in analyzer_a.decomposition(every).items():
        s = signs[:, : svd.S.shape[1]][:, None, :]
        analyzer_a._svd[layer] = LayerSVD(layer=layer, U=svd.U * s, S=svd.S, V=svd.V * s)
    flipped = head_profiles(analyzer_a, layers=None, profile=profile)
    assert torch.allclose(flipped.profiles, p.profiles, atol=1e-6)
    # the coder's options do not enter a capacity profile
    assert torch.equal(head_profiles(analyzer_a, None, "comp", 2, 0.9, profile=profile).profiles, flipped.profiles)


def test_a_head_writing_exactly_a_concept_gets_that_concepts_largest_share(analyzer_a):
    g = concept_directions(analyzer_a).double()
    d = g.shape[1]
    heads = []
    for concept in ("blue", "water", "triangle"):
        c = CONCEPTS.index(concept)
        v = torch.zeros(d, 2, dtype=torch.float64)
        v[:, 0] = g[c]  # the head writes only along ĝ_c (second direction has σ = 0)
        v[:, 1] = torch.linalg.qr(torch.stack([g[c], torch.randn(d, dtype=torch.float64)], 1))[0][:, 1]
        heads.append((c, v))
    svd = LayerSVD(layer=0, U=torch.zeros(3, d, 2), S=torch.tensor([[2.0, 0.0]] * 3),
                   V=torch.stack([v for _, v in heads]).float())
    capacity = write_capacity(svd, g)
    for h, (c, _) in enumerate(heads):
        assert int(capacity[h].argmax()) == c
        assert float(capacity[h, c]) == pytest.approx(4.0, rel=1e-5)  # σ² · ‖ĝ_c‖²: all of it
        assert bool((capacity[h] <= capacity[h, c] + 1e-9).all())


def test_relative_capacity_divides_by_the_towers_mean_head_and_ignores_which_layers_are_profiled(analyzer_a):
    every = list(range(analyzer_a.loaded.info.layers))
    g = concept_directions(analyzer_a)
    raw = torch.cat([write_capacity(svd, g) for svd in analyzer_a.decomposition(every).values()])
    expected = raw / raw.mean(0, keepdim=True)
    expected = expected / expected.sum(1, keepdim=True)
    full = capacity_profiles(analyzer_a, every, relative=True)
    assert torch.allclose(full.profiles.double(), expected, atol=1e-6)
    last = capacity_profiles(analyzer_a, [-1], relative=True)
    assert torch.allclose(last.profiles, full.profiles[-analyzer_a.loaded.info.heads:], atol=1e-6)
    plain = capacity_profiles(analyzer_a, [-1], relative=False)
    assert not torch.allclose(plain.profiles, last.profiles, atol=1e-4)
    with pytest.raises(InvalidInput) as info:
        head_profiles(analyzer_a, profile="bogus")
    assert info.value.field == "profile"


def test_category_permutation_moves_each_category_as_one_block():
    concepts = CONCEPTS[:14]
    blocks = category_blocks(concepts, CATEGORIES)
    assert sorted(i for b in blocks for i in b) == list(range(14))  # every column in exactly one block
    assert [concepts[i] for i in blocks[0]] == [c for c in CATEGORIES["colour"] if c in concepts]
    rng = np.random.default_rng(0)
    profiles = rng.random((10, 14))
    shuffled = category_permutation(profiles, blocks, rng)
    for block in blocks:
        rows = [int(np.flatnonzero(np.all(profiles[:, block] == shuffled[r, block], axis=1))[0]) for r in range(10)]
        assert sorted(rows) == list(range(10))  # a permutation of B's heads, the same for the whole block
    assert np.allclose(shuffled.sum(0), profiles.sum(0))
    assert not np.allclose(shuffled, profiles)


def _factor_heads(seed: int, n_heads: int = 12) -> torch.Tensor:
    """Dense profiles over 3 categories × 4 concepts + 2 others: each head loads on each category with
    its own random weight, spread over the category's concepts the same way in every head (related
    concepts move together, as capacities along correlated text directions do). Nothing else is shared."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([1.0, 0.8, 0.6, 0.4])
    loading = torch.rand(n_heads, 3, generator=g) ** 3
    parts = [loading[:, k:k + 1] * spread for k in range(3)] + [0.2 * torch.ones(n_heads, 2)]
    return torch.cat(parts, 1) + 0.01 * torch.rand(n_heads, 14, generator=g)


def test_the_categories_null_is_valid_for_dense_profiles_where_the_usage_null_is_not():
    concepts = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "star",
                "water", "land", "snow", "forest", "dog", "car"]
    usage_p, block_p = [], []
    for pair in range(8):
        a = HeadProfiles([(0, i) for i in range(12)], _factor_heads(100 + 2 * pair), concepts)
        b = HeadProfiles([(0, i) for i in range(12)], _factor_heads(101 + 2 * pair), concepts)
        observed = float(np.mean([m.score for m in match_profiles(a, b)[0]]))
        usage_p.append(permutation_p(observed, null_scores(a, b, 100, seed=pair)))
        block_p.append(permutation_p(observed, null_scores(a, b, 100, seed=pair, kind="categories",
                                                           categories=CATEGORIES)))
    assert sum(p < 0.05 for p in usage_p) >= 6  # unrelated models called alike: the usage null is too easy here
    assert np.median(block_p) > 0.2 and sum(p < 0.05 for p in block_p) <= 2
    a = HeadProfiles([(0, i) for i in range(12)], _factor_heads(7), concepts)
    assert permutation_p(1.0, null_scores(a, a, 50, kind="categories", categories=CATEGORIES)) < 0.05
    with pytest.raises(InvalidInput) as info:
        null_scores(a, a, 10, kind="categories")
    assert info.value.field == "categories"


def test_label_agreement_per_label():
    labels_a = ["colour", "colour", "shape", "background", "background", "background"]
    labels_b = ["colour", "shape", "shape", "background", "background", "colour"]
    pairs = [(i, i) for i in range(6)]
    result = label_agreement(pairs, labels_a, labels_b, permutations=400)
    per = result["per_label"]
    assert set(per) == {"colour", "shape", "background"}
    assert (per["colour"]["agreeing"], per["colour"]["pairs"]) == (1, 2)
    assert (per["shape"]["agreeing"], per["shape"]["pairs"]) == (1, 1)
    assert (per["background"]["agreeing"], per["background"]["pairs"]) == (2, 3)
    assert sum(row["agreeing"] for row in per.values()) == result["agreeing"] == 4
    # chance of an L-head of A meeting an L-head of B: pairs · (B's L-heads / B's heads)
    assert per["colour"]["chance_mean"] == pytest.approx(2 * 2 / 6, abs=0.1)
    assert per["background"]["chance_mean"] == pytest.approx(3 * 2 / 6, abs=0.15)
    assert all(0 < row["p_value"] <= 1 for row in per.values())


def test_match_report_profiles_and_schema(models, tmp_path):
    from sith.adaptation.reports import match_report
    from sith.cli.adapt import match

    a, b = models
    analyzer_a = Analyzer(a, build_dictionary(a, CONCEPTS, cache_dir=tmp_path))
    analyzer_b = Analyzer(b, build_dictionary(b, CONCEPTS, cache_dir=tmp_path))
    results = {}
    for profile in PROFILES:
        result, extras = match_report(analyzer_a, analyzer_b, None, None, CATEGORIES, k=3, permutations=10,
                                      profile=profile)
        assert result["profile"] == profile and result["category_null"]["kind"] == "categories"
        assert 0 < result["category_null"]["p_value"] <= 1 and result["null"]["kind"] == "usage"
        results[profile] = extras["profiles_a"].profiles
    assert not torch.allclose(results["comp"], results["relative-capacity"])
    assert DEFAULT_PROFILE == "relative-capacity"
    default, _ = match_report(analyzer_a, analyzer_b, None, None, None, k=3, permutations=5)
    assert default["profile"] == DEFAULT_PROFILE and "category_null" not in default  # one default: CLI, jobs, SDK
    with pytest.raises(InvalidInput):
        match_report(analyzer_a, analyzer_b, profile="sparse")
    choice = next(p for p in match.params if p.name == "profile")
    assert sorted(choice.type.choices) == sorted(PROFILES) and choice.default == DEFAULT_PROFILE


def test_capacity_is_per_head_and_relative_capacity_follows_the_tower(tmp_path):
    """A planted change in one head leaves every other head's capacity profile exactly as it was;
    the relative profile of the untouched heads moves with the tower's mean (why fine-tune
    comparisons keep "capacity" or "comp")."""
    from adaptation_fixtures import plant_rank_one

    base = tiny_clip(0)
    write = torch.randn(TINY_CFG["vision_cfg"]["width"], generator=torch.Generator().manual_seed(1))
    a = save_and_load(base, TINY_CFG, tmp_path, "base")
    b = save_and_load(plant_rank_one(base, 1, 2, write), TINY_CFG, tmp_path, "planted")
    analyzers = [Analyzer(m, build_dictionary(m, CONCEPTS, cache_dir=tmp_path)) for m in (a, b)]
    untouched = [i for i, h in enumerate(head_profiles(analyzers[0], None, profile="capacity").heads) if h != (1, 2)]
    for profile, same in (("capacity", True), ("relative-capacity", False)):
        pa, pb = (head_profiles(x, None, profile=profile).profiles for x in analyzers)
        assert torch.allclose(pa[untouched], pb[untouched], atol=1e-6) is same
        changed = pa.shape[0] - len(untouched)
        assert changed == 1 and not torch.allclose(pa, pb, atol=1e-4)


def test_ground_truth_similarity_scores_matched_factor_mixes_against_random_pairings():
    """Matched heads with the same relative η² mix score cosine 1 and beat every re-pairing; the
    relative profile divides each factor by its model mean, so a factor every head carries (raw
    background η²) does not make unrelated heads look alike."""
    from sith.adaptation.universality import ground_truth_similarity

    rng = np.random.default_rng(0)
    eta_a = torch.tensor(rng.random((12, 7)) ** 3) + torch.tensor([0.0, 0.0, 5.0, 0, 0, 0, 0])  # background everywhere
    order = rng.permutation(12)
    eta_b = eta_a[order] * 2.0  # B's head order[j] is A's head j (a uniform scale changes no relative profile)
    pairs = [(int(order[j]), j) for j in range(12)]
    result = ground_truth_similarity(pairs, eta_a, eta_b, permutations=200)
    assert result["observed"] == pytest.approx(1.0) and result["chance_mean"] < 0.95
    assert result["p_value"] == pytest.approx(1 / 201) and result["pairs"] == 12
    shuffled = ground_truth_similarity([(i, j) for i, j in zip(range(12), rng.permutation(12))], eta_a, eta_b,
                                       permutations=200)
    assert shuffled["p_value"] > 0.05
    assert ground_truth_similarity([], eta_a, eta_b)["pairs"] == 0


def test_untrained_control_of_a_transformers_clip():
    """The control re-initialises a transformers CLIP vision tower and its visual projection as
    open_clip builds a ViT (it raised an AttributeError before); the text tower is kept."""
    from test_engine_towers import build

    from sith.engine.models import LoadedModel, vision_hash, vision_info

    model = build("hf-clip")
    loaded = LoadedModel(model=model, tokenizer=None, name="hf", hash=vision_hash(model), info=vision_info(model),
                         preprocess=None)
    control = untrained_vision_control(loaded, seed=0)
    assert control.hash != loaded.hash and control.hash == untrained_vision_control(loaded, seed=0).hash
    before, after = model.hf.state_dict(), control.model.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("text_"))
    for key in ("vision_model.embeddings.class_embedding", "visual_projection.weight"):
        assert not torch.equal(before[key], after[key])
