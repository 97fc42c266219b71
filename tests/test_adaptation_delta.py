"""Delta analysis and basis stability on tiny random CLIPs with planted changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adaptation_fixtures import TINY_CFG, plant_rank_one, save_and_load, tiny_clip
from edits_fixtures import CONCEPTS
from sith.adaptation.delta import analyze_delta, delta_decomposition
from sith.adaptation.stability import layer_stability, stability
from sith.edits.apply import apply_multipliers
from sith.edits.multipliers import Multipliers
from sith.engine.analysis import Analyzer
from sith.engine.decomposition import decompose, dense_vo
from sith.engine.dictionary import build_dictionary
from sith.engine.errors import InvalidInput
from sith.engine.jointspace import JointSpace, resolve_image_mean

LAYER, HEAD = 2, 1


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_and_load(tiny_clip(0), TINY_CFG, tmp_path_factory.mktemp("base"), "base")


@pytest.fixture(scope="module")
def planted(base, tmp_path_factory):
    """Head (2, 1) additionally writes the residual direction that maps onto the concept "water"."""
    dictionary = build_dictionary(base, CONCEPTS, cache_dir=tmp_path_factory.mktemp("dict"))
    joint = JointSpace.for_model(base, resolve_image_mean(base, "directions"))
    write = joint.inverse(dictionary.centred[CONCEPTS.index("water")][None])[0]
    write = write - write.mean()
    ft = save_and_load(plant_rank_one(base.model, LAYER, HEAD, write, scale=2.0), TINY_CFG,
                       tmp_path_factory.mktemp("ft"), "ft")
    return ft, write


def test_delta_svd_from_factors_equals_the_dense_difference(base, tmp_path):
    other = copy.deepcopy(base.model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in other.visual.named_parameters():
            if "transformer" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))  # ln_1 too: each model folds its own
    ft = save_and_load(other, TINY_CFG, tmp_path, "noisy")
    delta = delta_decomposition(base, ft, layers=[0, 2])
    heads = base.info.heads
    for layer, svd in delta.items():
        dense = dense_vo(ft.model.visual.transformer.resblocks[layer], heads) \
            - dense_vo(base.model.visual.transformer.resblocks[layer], heads)
        rebuilt = svd.U @ torch.diag_embed(svd.S) @ svd.V.transpose(1, 2)
        assert svd.S.shape == (heads, 2 * base.info.head_dim)
        assert torch.allclose(rebuilt, dense, atol=1e-5)
        assert torch.allclose(svd.S, torch.linalg.svdvals(dense)[:, : svd.S.shape[1]], atol=1e-5)


def test_planted_change_is_found_in_exactly_that_head_and_direction(base, planted):
    ft, write = planted
    delta = delta_decomposition(base, ft, layers=None)
    for layer, svd in delta.items():
        for h in range(base.info.heads):
            if (layer, h) == (LAYER, HEAD):
                s = svd.S[h]
                assert s[0] > 0.1 and s[1] < 1e-5 * s[0]  # rank one
                cos = F.cosine_similarity(svd.V[h, :, 0], write, dim=0).abs()
                assert cos > 0.9999
            else:
                assert svd.S[h].max() < 1e-5


def test_explanation_names_the_planted_concept(base, planted, tmp_path):
    ft, _ = planted
    analyzer = Analyzer(ft, build_dictionary(ft, CONCEPTS, cache_dir=tmp_path))
    report = analyze_delta(base, ft, analyzer, directions=2)
    top = report.top_heads(1)[0]
    assert (top.layer, top.head) == (LAYER, HEAD)
    assert top.effective_rank == pytest.approx(1.0, abs=1e-3)
    poles = [c for c, _ in top.directions[0].positive[:1] + top.directions[0].negative[:1]]
    assert "water" in poles
    unchanged = [h for h in report.heads if (h.layer, h.head) != (LAYER, HEAD)]
    assert all(h.relative < 1e-5 and not h.directions for h in unchanged)
    summary = {row["layer"]: row for row in report.layers}
    assert summary[LAYER]["top_head"] == HEAD and summary[LAYER]["max_relative"] == top.relative


def test_pure_reweighting_is_stable_and_ratios_are_the_multipliers(base, tmp_path):
    decomposition = decompose(base, [LAYER])
    r = base.info.head_dim
    alpha = torch.ones(base.info.heads, r)
    alpha[HEAD] = torch.linspace(0.3, 2.5, r)  # reorders the spectrum: matching must undo it
    edited = apply_multipliers(base.model, Multipliers({LAYER: alpha}), decomposition)
    ft = save_and_load(edited, TINY_CFG, tmp_path, "reweighted")
    items = {(s.layer, s.head): s for s in stability(base, ft, layers=[LAYER])}
    s = items[(LAYER, HEAD)]
    assert min(s.matched_cos) > 0.999
    assert s.matching != list(range(r))  # the order did change
    assert torch.allclose(torch.tensor(s.sigma_ratio, dtype=torch.float64), alpha[HEAD].double(), atol=1e-3)
    assert s.diagonal_dominance > 0.9999 and s.captured > 0.9999
    assert min(s.right_angle_cos) > 0.9999 and min(s.left_angle_cos) > 0.9999
    other = items[(LAYER, 0)]
    assert other.sigma_ratio == pytest.approx([1.0] * r, abs=1e-5)


def test_rotation_lowers_stability(base, planted):
    ft, _ = planted
    items = {(s.layer, s.head): s for s in stability(base, ft, layers=[LAYER])}
    changed, same = items[(LAYER, HEAD)], items[(LAYER, 0)]
    assert same.diagonal_dominance > 0.9999
    assert changed.diagonal_dominance < same.diagonal_dominance - 1e-3
    assert changed.captured < 1.0 - 1e-3  # the planted write leaves the base subspace
    rows = layer_stability(list(items.values()))
    assert rows[0]["layer"] == LAYER and rows[0]["diagonal_dominance"] < 1.0


def test_different_architectures_are_rejected(base, tmp_path):
    cfg = copy.deepcopy(TINY_CFG)
    cfg["vision_cfg"]["layers"] = 2
    torch.manual_seed(0)
    import open_clip
    other = save_and_load(open_clip.model.CLIP(**cfg), cfg, tmp_path, "other")
    with pytest.raises(InvalidInput) as info:
        delta_decomposition(base, other)
    assert info.value.field == "finetuned"
    with pytest.raises(InvalidInput) as info:
        stability(base, other)
    assert info.value.field == "finetuned"


def test_concept_share_is_sigma_weighted_over_both_poles():
    from sith.adaptation.delta import DeltaDirection, HeadDelta, concept_share

    heads = [HeadDelta(layer=0, head=0, norm=1.0, relative=1.0, effective_rank=1.0, directions=[
        DeltaDirection(index=0, sigma=3.0, positive=[("circle", 0.5)], negative=[("water", 0.5)]),
        DeltaDirection(index=1, sigma=1.0, positive=[("square", 1.0)], negative=[("circle", 1.0)]),
    ])]
    # circle: 3·0.5 + 1·1.0 = 2.5 of a total 3·1.0 + 1·2.0 = 5.0
    assert concept_share(heads, {"circle"}) == pytest.approx(0.5)
    assert concept_share(heads, {"oval"}) == 0.0
    assert concept_share([], {"circle"}) == 0.0


def test_concept_alignment_ranks_the_planted_concept_first(base, planted, tmp_path):
    from sith.adaptation.delta import concept_alignment

    ft, _ = planted
    analyzer = Analyzer(ft, build_dictionary(ft, CONCEPTS, cache_dir=tmp_path))
    delta = delta_decomposition(base, ft, layers=[LAYER])
    scores = concept_alignment(delta, [(LAYER, HEAD)], analyzer, directions=1)
    assert scores.shape == (len(CONCEPTS),)
    assert CONCEPTS[int(scores.argmax())] == "water"
    assert concept_alignment(delta, [], analyzer).abs().sum() == 0


def _svd_of(v: torch.Tensor, s: torch.Tensor, layer: int = 0):
    """A one-head LayerSVD with U = V (symmetric, enough for the right-subspace figures)."""
    from sith.engine.decomposition import LayerSVD

    return LayerSVD(layer=layer, U=v[None].clone(), S=s[None].clone(), V=v[None].clone())


def test_principal_angle_distribution_flags_one_rotated_direction():
    """Base write subspace span(e0..e3); fine-tuned: e3 turned by 60° towards e4. The mean cosine
    (0.875) looks stable, the distribution shows one direction at cos 0.5 and flags it."""
    from sith.adaptation.stability import ROTATED_COS, head_stability

    d, r = 8, 4
    eye = torch.eye(d, dtype=torch.float64)
    v_base = eye[:, :r].clone()
    v_ft = v_base.clone()
    angle = torch.tensor(60.0, dtype=torch.float64).deg2rad()
    v_ft[:, 3] = torch.cos(angle) * eye[:, 3] + torch.sin(angle) * eye[:, 4]
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    base_svd, ft_svd = _svd_of(v_base, sigma), _svd_of(v_ft, sigma)
    factors = ((v_ft * sigma)[None], v_ft.T[None])  # W_ft = (V diag σ) Vᵀ
    (s,) = head_stability(base_svd, ft_svd, factors)
    dist = s.right_cos_distribution()
    assert s.mean_right_cos == pytest.approx(0.875, abs=1e-6)
    assert dist["min"] == pytest.approx(0.5, abs=1e-6)
    assert dist["median"] == pytest.approx(1.0, abs=1e-6) and dist["max"] == pytest.approx(1.0, abs=1e-6)
    flagged = s.rotated()
    assert [i for i, _ in flagged["principal"]] == [3] and flagged["principal"][0][1] == pytest.approx(60.0, abs=0.1)
    assert [j for j, _ in flagged["matched_vectors"]] == [3]
    assert s.rotated(threshold=0.4) == {"principal": [], "matched_vectors": []}
    row = layer_stability([s])[0]
    assert row["right_cos_min"] == pytest.approx(0.5, abs=1e-6) and row["rotated_principal"] == 1
    assert row["right_cos_median"] == pytest.approx(1.0, abs=1e-6) and ROTATED_COS == 0.8


def test_spectra_keep_base_order_for_a_suppressed_vector(base):
    """Zeroing base vector 0 re-sorts the edited SVD; by base index it stays at j = 0."""
    from sith.adaptation.plots import base_order
    from sith.engine.decomposition import decompose_layer

    decomposition = decompose(base, [LAYER])
    r = decomposition[LAYER].S.shape[1]
    alpha = torch.ones(base.info.heads, r)
    alpha[HEAD, 0] = 0.0
    edited = apply_multipliers(base.model, Multipliers({LAYER: alpha}), decomposition)
    with torch.no_grad():
        after = decompose_layer(edited.visual.transformer.resblocks[LAYER], base.info.heads, LAYER)
    ordered = base_order(decomposition[LAYER], after)
    before = decomposition[LAYER].S.double().numpy()
    assert ordered[HEAD, 0] == pytest.approx(0.0, abs=1e-4 * before[HEAD, 0])
    assert ordered[HEAD, 1:] == pytest.approx(before[HEAD, 1:], rel=1e-3)
    assert after.S[HEAD, 0] == pytest.approx(before[HEAD, 1], rel=1e-3)  # the raw spectrum did move
    assert ordered[0] == pytest.approx(before[0], rel=1e-3)
