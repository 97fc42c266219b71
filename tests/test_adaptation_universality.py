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
