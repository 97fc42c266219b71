"""Edit operators beyond scaling: exact write-back, identity, revert and composition through the
manifest, plain open_clip loading, target-driven planning and the bad-input cases."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from edits_fixtures import CONCEPTS, TINY_CFG, images, plan_inputs, tiny_loaded
from sith.edits.apply import apply_multipliers, revert
from sith.edits.multipliers import Multipliers, WriteMap
from sith.edits import plan as plan_module
from sith.edits.operators import OPERATORS, Geometry, preserving_pair, resolve_operator, tower_writers
from sith.edits.plan import neighbours, operation_layers, plan_from_vectors, preserved_concepts
from sith.edits.spec import DEFAULT_DEBIAS_TARGET, DEFAULT_SUPPRESS_TARGET, EditSpec, Operation, explicit, top_n
from sith.engine.decomposition import dense_vo, head_value_bias
from sith.engine.dictionary import build_dictionary
from sith.engine.errors import InvalidInput

LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ops")
    loaded = tiny_loaded(tmp)
    dictionary = build_dictionary(loaded, CONCEPTS, cache_dir=tmp)
    decomposition, joint, vectors = plan_inputs(loaded, dictionary, LAYERS)
    return loaded, dictionary, decomposition, joint, vectors


def _plan(stack, *operations, preserve_weight: float = 1.0, **extra):
    loaded, dictionary, decomposition, joint, vectors = stack
    spec = EditSpec(model="tiny", operations=list(operations)).validate()
    return plan_from_vectors(spec, loaded.name, loaded.hash, decomposition, vectors,
                             operation_layers(loaded.info, spec), joint, dictionary, preserve_weight=preserve_weight,
                             model=loaded.model, **extra)


def _embed(model, x=None):
    with torch.no_grad():
        return model.encode_image(images() if x is None else x)


def _patched(model, maps: dict[tuple[int, int], torch.Tensor], proj_map: torch.Tensor | None = None,
             mlp_maps: dict[int, torch.Tensor] | None = None):
    """Independent reference: multiply the raw out_proj columns by T (row form W_O ← W_O T) and keep
    each head's constant value term in the bias; the raw MLP c_proj weight likewise (W ← Tᵀ W in
    nn.Linear's [out, in] layout, bias untouched); no SVD involved."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, t in (mlp_maps or {}).items():
            fc = ref.visual.transformer.resblocks[layer].mlp.c_proj
            fc.weight.copy_((t.T @ fc.weight.double()).float())
    blocks = ref.visual.transformer.resblocks
    heads = blocks[0].attn.num_heads
    dh = blocks[0].attn.embed_dim // heads
    with torch.no_grad():
        for (layer, head), t in maps.items():
            attn = blocks[layer].attn
            cols = slice(head * dh, (head + 1) * dh)
            old = attn.out_proj.weight[:, cols].double()  # [d, dh] = W_Oᵀ
            new = t.T @ old
            c_h = head_value_bias(blocks[layer], heads)[head].double()
            attn.out_proj.bias += ((old - new) @ c_h).float()
            attn.out_proj.weight[:, cols] = new.float()
        if proj_map is not None:
            ref.visual.proj.copy_((ref.visual.proj.double() @ proj_map).float())
    return ref


def _head_maps(plan) -> dict[tuple[int, int], torch.Tensor]:
    return {(layer, head): plan.multipliers.write_matrix("head", layer, head)
            for site, layer, head in plan.multipliers.mapped_writers() if site == "head"}


def _mlp_maps(plan) -> dict[int, torch.Tensor]:
    return {layer: plan.multipliers.write_matrix("mlp", layer)
            for site, layer, _ in plan.multipliers.mapped_writers() if site == "mlp"}


def edit_options_params() -> list:
    """The click parameters of ``sith edit preview`` (the CLI's edit options)."""
    from sith.cli import main

    return main.commands["edit"].commands["preview"].params


def test_operator_registry_and_unknown_names():
    from sith.cli.edits import OPERATOR_CHOICES

    assert set(OPERATORS) == {"sith_scale", "head_project", "head_mlp_project", "head_mlp_orthogonal", "head_ablation",
                              "output_projection"}
    assert OPERATOR_CHOICES == ("auto", *OPERATORS)  # the CLI's list (kept torch-free) names every operator
    target_help = next(p.help for p in edit_options_params() if p.name == "target")
    assert f"default {DEFAULT_SUPPRESS_TARGET:g}," in target_help  # ... and its help the default targets
    assert f"debias: default {DEFAULT_DEBIAS_TARGET:g}" in target_help
    assert resolve_operator("auto") == resolve_operator(None) == "head_mlp_orthogonal"
    with pytest.raises(InvalidInput) as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], "operator": "head_projct"}]})
    assert err.value.field == "operations[0].operator" and "head_project" in err.value.suggestions


def test_preserving_pair_scales_u_exactly_and_spares_what_is_preserved():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    keep = torch.randn(16, 3, generator=g, dtype=torch.float64)
    for lam in (0.0, 1.0, 1e6):
        u_, v = preserving_pair(u, keep, lam)
        t = torch.eye(16, dtype=torch.float64) - 0.7 * torch.outer(u_, v)  # α = 0.3
        assert torch.allclose(t @ u, 0.3 * u, atol=1e-10)
    assert torch.allclose(preserving_pair(u, keep, 0.0)[1], u)  # λ = 0: orthogonal projection
    _, v = preserving_pair(u, keep, 1e6)
    t = torch.eye(16, dtype=torch.float64) - torch.outer(u, v)
    assert torch.allclose(t @ keep, keep, atol=1e-4)  # λ → ∞: preserved directions untouched


def test_preserving_pair_other_concepts_term_spares_them_and_keeps_u_exact():
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(24, generator=g, dtype=torch.float64), dim=0)
    keep = torch.randn(24, 3, generator=g, dtype=torch.float64)
    others = torch.nn.functional.normalize(torch.randn(24, 10, generator=g, dtype=torch.float64), dim=0)
    eye = torch.eye(24, dtype=torch.float64)
    moved = []
    for lam_o in (0.0, 2.0, 8.0, 128.0):
        u_, v = preserving_pair(u, keep, 2.0, others, lam_o)
        t = eye - 0.8 * torch.outer(u_, v)  # α = 0.2
        assert torch.allclose(t @ u, 0.2 * u, atol=1e-10)  # the edited direction: exactly α, whatever λ_o
        moved.append(float(((t - eye) @ others).norm()))
    assert all(a > b for a, b in zip(moved, moved[1:])), moved  # more weight, less change to the others
    assert torch.allclose(preserving_pair(u, keep, 2.0, others, 0.0)[1], preserving_pair(u, keep, 2.0)[1])
    # normalised by their number: listing every other concept twice means the same λ_o
    assert torch.allclose(preserving_pair(u, keep, 2.0, others, 8.0)[1],
                          preserving_pair(u, keep, 2.0, torch.cat([others, others], dim=1), 8.0)[1], atol=1e-12)


def test_preserve_others_weight_spares_other_factors_and_keeps_alpha_exact(stack):
    """With λ_o > 0 the edited heads change the other factors' directions less than with λ_o = 0,
    while their write along the concept's direction is still multiplied by exactly the same α."""
    loaded, dictionary, decomposition, joint, _ = stack
    geometry = Geometry(joint, dictionary, decomposition)
    op = Operation(["red"], "suppress", 0.2, operator="head_project", layers=[1, 2], select=top_n(4))
    spec = EditSpec(model="tiny", operations=[op]).validate()
    others = plan_module.other_concepts(spec, 0, dictionary, preserved_concepts(spec, 0, dictionary))
    assert others and not {"red", "blue", "green", "yellow"} & set(others)  # no colour: red's own factor
    g_red = geometry.residual_direction("red")
    g_others = torch.stack([geometry.residual_direction(c) for c in others])  # [n, d]
    blocks = loaded.model.visual.transformer.resblocks
    changes, alphas = [], []
    for lam_o in (0.0, 8.0):
        plan = _plan(stack, op, preserve_weight=2.0, preserve_others_weight=lam_o)
        edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
        alphas.append(sorted((a.layer, a.head, a.alpha) for a in plan.affected))
        change = 0.0
        for a in plan.affected:
            before = dense_vo(blocks[a.layer], 4)[a.head].double()
            after = dense_vo(edited.visual.transformer.resblocks[a.layer], 4)[a.head].double()
            assert torch.allclose(after @ g_red, a.alpha * (before @ g_red), atol=1e-5)
            change += float(((after - before) @ g_others.T).norm() ** 2)
        changes.append(change)
    assert alphas[0] == alphas[1]  # same writers, same closed-form α
    assert changes[1] < 0.9 * changes[0], changes


@pytest.mark.parametrize("field", ["preserve_weight", "preserve_others_weight"])
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), "much", None, True])
def test_bad_preservation_weights_are_named(stack, field, value):
    with pytest.raises(InvalidInput) as err:
        _plan(stack, Operation(["red"]), **{field: value})
    assert err.value.field == field and ">= 0" in err.value.reason


def test_head_project_writes_back_exactly_and_scales_the_concept_direction(stack):
    loaded, dictionary, decomposition, joint, _ = stack
    plan = _plan(stack, Operation(["red"], "suppress", 0.25, layers=[1, 2], select=top_n(3), operator="head_project"))
    assert len(plan.affected) == 3 and all(a.operator == "head_project" and a.alpha == 0.25 for a in plan.affected)
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    reference = _patched(loaded.model, _head_maps(plan))
    assert (_embed(edited) - _embed(reference)).abs().max() < 1e-5
    assert (_embed(edited) - _embed(loaded.model)).abs().max() > 1e-4  # it did something
    # on the folded/centred W_VO: the write along ĝ is multiplied by α, in every chosen head
    g = Geometry(joint, dictionary, decomposition).residual_direction("red")
    blocks_before = loaded.model.visual.transformer.resblocks
    blocks_after = edited.visual.transformer.resblocks
    for a in plan.affected:
        before = dense_vo(blocks_before[a.layer], 4)[a.head].double() @ g
        after = dense_vo(blocks_after[a.layer], 4)[a.head].double() @ g
        assert torch.allclose(after, 0.25 * before, atol=1e-5)
    # in_proj and ln_1 are never touched (stock layout, only out_proj changes)
    for b0, b1 in zip(blocks_before, blocks_after):
        assert torch.equal(b0.attn.in_proj_weight, b1.attn.in_proj_weight) and torch.equal(b0.ln_1.weight, b1.ln_1.weight)


def test_alpha_one_and_no_op_are_the_identity(stack):
    loaded, _, decomposition, _, _ = stack
    u = torch.nn.functional.normalize(torch.randn(64, dtype=torch.float64), dim=0)
    w = torch.nn.functional.normalize(torch.randn(32, dtype=torch.float64), dim=0)
    values = {layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()}
    identity = Multipliers(values, None, [(u, u), (w, w)],
                           [WriteMap("head", 1, 2, 0, 1.0), WriteMap("head", 2, 0, 0, 1.0), WriteMap("output", -1, -1, 1, 1.0)])
    edited = apply_multipliers(loaded.model, identity, decomposition)
    assert (_embed(edited) - _embed(loaded.model)).abs().max() < 1e-5
    untouched = apply_multipliers(loaded.model, Multipliers(values), decomposition)
    for p0, p1 in zip(loaded.model.parameters(), untouched.parameters()):
        assert torch.equal(p0, p1)


def test_output_projection_rewrites_only_proj(stack):
    loaded, dictionary, decomposition, joint, _ = stack
    plan = _plan(stack, Operation(["blue"], "suppress", operator="output_projection", target=0.2))
    assert [a.operator for a in plan.affected] == ["output_projection"]
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    t = plan.multipliers.write_matrix("output")
    reference = _patched(loaded.model, {}, t)
    assert (_embed(edited) - _embed(reference)).abs().max() < 1e-6
    r = Geometry(joint, dictionary, decomposition).joint_direction("blue")
    assert float(r @ t @ r) == pytest.approx(0.2, abs=1e-9)
    changed = [n for (n, p0), p1 in zip(loaded.model.named_parameters(), edited.parameters()) if not torch.equal(p0, p1)]
    assert changed == ["visual.proj"]
    target = next(e for e in plan.predicted if e.role == "target")
    assert target.after == pytest.approx(0.2, abs=1e-9)
    # its presence is a text-direction share, not a recognition estimate: the preview says so
    assert any(w.startswith("[uncalibrated] operations[0]") for w in plan.warnings)


def test_head_ablation_zeroes_whole_heads(stack):
    loaded, _, decomposition, _, _ = stack
    plan = _plan(stack, Operation(["green"], "suppress", operator="head_ablation", select=top_n(2)))
    heads = {(a.layer, a.head) for a in plan.affected}
    assert len(heads) == 2 and len(plan.affected) == 2 * 16
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    for layer, head in heads:
        assert dense_vo(edited.visual.transformer.resblocks[layer], 4)[head].abs().max() < 1e-5
    with pytest.raises(InvalidInput, match="only suppresses") as err:
        _plan(stack, Operation(["green"], "amplify", operator="head_ablation"))
    assert err.value.field == "operations[0].operator"


def test_revert_compose_and_manifest_round_trip_are_exact(stack, tmp_path):
    loaded, _, decomposition, _, _ = stack
    a = _plan(stack, Operation(["red"], "suppress", 0.5, layers=[1, 2], select=top_n(3), operator="head_project"))
    b = _plan(stack, Operation(["circle"], "amplify", 2.0, layers=[2], select=top_n(2), operator="head_project"),
              Operation(["water"], "suppress", operator="output_projection", target=0.5))
    # manifest and bytes round trips keep the edit bit for bit
    assert Multipliers.from_manifest(a.manifest()["multipliers"]) == a.multipliers
    assert Multipliers.from_bytes(b.multipliers.to_bytes()) == b.multipliers
    both = a.multipliers.compose(b.multipliers)
    edited = apply_multipliers(loaded.model, both, decomposition)
    reference = _patched(loaded.model, {**_head_maps(a), **{k: _head_maps(a).get(k, torch.eye(64, dtype=torch.float64))
                                                            @ t for k, t in _head_maps(b).items()}},
                         b.multipliers.write_matrix("output"))
    assert (_embed(edited) - _embed(reference)).abs().max() < 1e-5
    # removing b again gives a exactly (maps cancel, they are not approximated)
    only_a = both.compose(b.multipliers.inverse())
    assert only_a.maps == a.multipliers.maps
    assert (_embed(apply_multipliers(loaded.model, only_a, decomposition))
            - _embed(apply_multipliers(loaded.model, a.multipliers, decomposition))).abs().max() < 1e-5
    # a ∘ a⁻¹ is the identity; revert from any edit gives the base back
    assert a.multipliers.compose(a.multipliers.inverse()).is_identity()
    heads_only = Multipliers(both.values, None, both.pairs, [m for m in both.maps if m.site == "head"])
    restored = revert(apply_multipliers(loaded.model, heads_only, decomposition), decomposition)
    assert (_embed(restored) - _embed(loaded.model)).abs().max() < 1e-5
    # a map buried under a later map on the same head cannot be removed exactly: refused
    same_heads = explicit([(m.layer, m.head, 0) for m in a.multipliers.maps])
    c = _plan(stack, Operation(["blue"], "suppress", 0.5, layers=[1, 2], select=same_heads, operator="head_project"))
    with pytest.raises(InvalidInput, match="do not commute"):
        a.multipliers.compose(c.multipliers).compose(a.multipliers.inverse())
    with pytest.raises(InvalidInput, match="a = 0"):
        _plan(stack, Operation(["red"], "suppress", 0.0, select=top_n(1))).multipliers.inverse()


def test_exported_projection_edit_loads_in_plain_open_clip(stack, tmp_path):
    from sith.edits.export import export_checkpoint

    loaded, _, decomposition, _, _ = stack
    plan = _plan(stack, Operation(["red"], "suppress"))
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    path = tmp_path / "red.safetensors"
    export_checkpoint(edited, path, plan.manifest())
    plain = open_clip.model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    plain.load_state_dict(load_file(str(path)))
    x = images()
    assert (_embed(plain, x) - _embed(edited, x)).abs().max() < 1e-6


def test_default_plan_reaches_its_target_and_reports_every_preserved_concept(stack):
    loaded, dictionary, decomposition, _, _ = stack
    plan = _plan(stack, Operation(["red"]))
    op = plan.spec.operations[0]
    assert op.operator == "head_mlp_orthogonal" and op.select.rule == "auto"
    assert op.target == pytest.approx(DEFAULT_SUPPRESS_TARGET)
    roles = {e.concept: e.role for e in plan.predicted}
    assert roles["red"] == "target"
    assert {c for c, r in roles.items() if r == "preserve"} == set(neighbours(dictionary, "red")) == {"blue", "green", "yellow"}
    # every head and every MLP is a writer; the presence aimed at is the target corrected by the prior
    assert {(a.layer, a.head) for a in plan.affected} == {(l, h) for l in LAYERS for h in (-1, 0, 1, 2, 3)}
    geometry = Geometry(plan_inputs(loaded, dictionary, LAYERS)[1], dictionary, decomposition, *tower_writers(loaded))
    prior = geometry.prior_score("red", preserved_concepts(plan.spec, 0, dictionary))
    assert prior != 0.0
    aimed = max(0.0, DEFAULT_SUPPRESS_TARGET - plan_module.PRIOR_WEIGHT * prior)
    red = next(e for e in plan.predicted if e.concept == "red")
    assert red.before == 1.0 and red.after == pytest.approx(aimed, abs=1e-6)
    assert any("leans" in n for n in plan.notes)
    # the prediction is what the edited weights really write (dense W_VO and the raw MLP weights, no
    # SVD): the signed share along ĝ, MLP hidden units weighted by their data-free RMS
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    g = geometry.residual_direction("blue")
    num = den = 0.0
    for layer in LAYERS:
        w0 = dense_vo(loaded.model.visual.transformer.resblocks[layer], 4).double() @ g
        w1 = dense_vo(edited.visual.transformer.resblocks[layer], 4).double() @ g
        num += float((w0 * w1).sum())
        den += float((w0 * w0).sum())
        m0 = geometry.mlp[layer] @ g
        raw0 = loaded.model.visual.transformer.resblocks[layer].mlp.c_proj.weight.double().T
        raw1 = edited.visual.transformer.resblocks[layer].mlp.c_proj.weight.double().T
        scale = m0 / (raw0 @ g)  # the RMS weights, recovered from the geometry
        m1 = scale * (raw1 @ g)
        num += float((m0 * m1).sum())
        den += float((m0 * m0).sum())
    blue = next(e for e in plan.predicted if e.concept == "blue")
    assert blue.after == pytest.approx(num / den, abs=1e-4)
    # with explicit preserve, the concept is reported as preserved too
    plan = _plan(stack, Operation(["red"], preserve=["water"], preserve_neighbours=False))
    assert {(e.concept, e.role) for e in plan.predicted} == {("red", "target"), ("water", "preserve")}


def test_target_driven_sith_scale_and_head_ablation_meet_their_predicted_target(stack):
    plan = _plan(stack, Operation(["red"], operator="sith_scale", target=0.5))
    red = next(e for e in plan.predicted if e.concept == "red")
    assert red.after <= 0.5 + 1e-9 and all(a.alpha == 0.0 for a in plan.affected)
    plan = _plan(stack, Operation(["red"], operator="head_ablation", target=0.6))
    red = next(e for e in plan.predicted if e.concept == "red")
    assert red.after <= 0.6 + 1e-9


def test_strength_is_honoured_for_suppress_and_flip(stack):
    plan = _plan(stack, Operation(["red"], "suppress", 0.4, select=top_n(2)))
    assert [a.alpha for a in plan.affected] == [0.4, 0.4]
    plan = _plan(stack, Operation(["red"], "flip", -0.5, select=top_n(2)))
    assert [a.alpha for a in plan.affected] == [-0.5, -0.5]
    plan = _plan(stack, Operation(["red"], "flip", -0.5, select=top_n(2), operator="sith_scale"))
    assert {a.alpha for a in plan.affected} == {-0.5}


def test_head_mlp_project_writes_back_exactly_composes_and_reverts(stack, tmp_path):
    loaded, dictionary, decomposition, joint, _ = stack
    plan = _plan(stack, Operation(["red"], "suppress", 0.3, layers=[1, 2], select=top_n(5), operator="head_mlp_project"))
    assert all(a.operator == "head_mlp_project" and a.alpha == 0.3 for a in plan.affected)
    mlps = _mlp_maps(plan)
    assert mlps, "the MLPs carry the largest shares in this tower and must be chosen"
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    reference = _patched(loaded.model, _head_maps(plan), mlp_maps=mlps)
    assert (_embed(edited) - _embed(reference)).abs().max() < 1e-5
    # each edited MLP's write along ĝ is multiplied by exactly α; its bias and input side never change
    g = Geometry(joint, dictionary, decomposition).residual_direction("red")
    for layer in mlps:
        b0, b1 = loaded.model.visual.transformer.resblocks[layer], edited.visual.transformer.resblocks[layer]
        before, after = b0.mlp.c_proj.weight.double().T @ g, b1.mlp.c_proj.weight.double().T @ g
        assert torch.allclose(after, 0.3 * before, atol=1e-5) and before.abs().max() > 1e-3
        assert torch.equal(b0.mlp.c_proj.bias, b1.mlp.c_proj.bias) and torch.equal(b0.mlp.c_fc.weight, b1.mlp.c_fc.weight)
    # manifest round trip, compose and exact removal through the manifest
    assert Multipliers.from_manifest(plan.manifest()["multipliers"]) == plan.multipliers
    other = _plan(stack, Operation(["water"], "suppress", 0.5, layers=[2], select=top_n(2), operator="head_mlp_project"))
    both = plan.multipliers.compose(other.multipliers)
    only = both.compose(other.multipliers.inverse())
    assert (_embed(apply_multipliers(loaded.model, only, decomposition)) - _embed(edited)).abs().max() < 1e-5
    assert plan.multipliers.compose(plan.multipliers.inverse()).is_identity()
    restored = apply_multipliers(loaded.model, plan.multipliers.compose(plan.multipliers.inverse()), decomposition)
    for p0, p1 in zip(loaded.model.parameters(), restored.parameters()):
        assert torch.equal(p0, p1)
    # exported, it loads in plain open_clip with the in-memory edit's embeddings
    from sith.edits.export import export_checkpoint

    path = tmp_path / "red-mlp.safetensors"
    export_checkpoint(edited, path, plan.manifest())
    plain = open_clip.model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    plain.load_state_dict(load_file(str(path)))
    assert (_embed(plain) - _embed(edited)).abs().max() < 1e-6
    # without the model the planner knows no MLP: refused by name, never a silent heads-only edit
    _, _, _, _, vectors = stack
    spec = EditSpec(model="tiny", operations=[Operation(["red"])]).validate()
    with pytest.raises(InvalidInput, match="head_project") as err:
        plan_from_vectors(spec, loaded.name, loaded.hash, decomposition, vectors, operation_layers(loaded.info, spec),
                          joint, dictionary)
    assert err.value.field == "operations[0].operator"


def test_head_mlp_orthogonal_solves_alpha_on_the_presence_writes_back_exactly_and_reverts(stack):
    loaded, dictionary, decomposition, joint, _ = stack
    plan = _plan(stack, Operation(["red"], target=0.5, operator="head_mlp_orthogonal"))
    assert {a.operator for a in plan.affected} == {"head_mlp_orthogonal"}
    (u, v), = plan.multipliers.pairs  # one symmetric pair: T = I − (1 − α) v̂ v̂ᵀ
    assert torch.allclose(u, v) and float(u.norm()) == pytest.approx(1.0)
    alpha = plan.affected[0].alpha
    assert 0.0 < alpha < 1.0 and {a.alpha for a in plan.affected} == {alpha}
    red = next(e for e in plan.predicted if e.concept == "red")
    geometry = Geometry(joint, dictionary, decomposition, *tower_writers(loaded))
    prior = geometry.prior_score("red", preserved_concepts(plan.spec, 0, dictionary))
    aimed = max(0.0, 0.5 - plan_module.PRIOR_WEIGHT * prior)
    assert red.after == pytest.approx(aimed, abs=1e-6)  # α solved on the (affine) predicted presence
    # written back exactly: the dense reference multiplies each raw writer by T, no SVD involved
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    reference = _patched(loaded.model, _head_maps(plan), mlp_maps=_mlp_maps(plan))
    assert (_embed(edited) - _embed(reference)).abs().max() < 1e-5
    # a write orthogonal to v̂ passes unchanged; the write along v̂ is scaled by α
    t = plan.multipliers.write_matrix("mlp", LAYERS[0])
    w = torch.randn(u.numel(), dtype=torch.float64)
    w_perp = w - (w @ u) * u
    assert torch.allclose(w_perp @ t, w_perp, atol=1e-9) and torch.allclose(u @ t, alpha * u, atol=1e-9)
    # manifest round trip and exact revert
    assert Multipliers.from_manifest(plan.manifest()["multipliers"]) == plan.multipliers
    restored = apply_multipliers(loaded.model, plan.multipliers.compose(plan.multipliers.inverse()), decomposition)
    for p0, p1 in zip(loaded.model.parameters(), restored.parameters()):
        assert torch.equal(p0, p1)


def test_head_mlp_orthogonal_uses_the_one_sided_form_where_it_cannot_reach_or_does_not_apply(stack, monkeypatch):
    monkeypatch.setattr(plan_module, "PRIOR_WEIGHT", 0.0)
    plan = _plan(stack, Operation(["red"], target=0.0, operator="head_mlp_orthogonal"))
    # presence 0 needs the whole write along ĝ gone; the symmetric map only reaches part of it
    assert {a.operator for a in plan.affected} == {"head_mlp_project"}
    assert any("symmetric map reaches presence" in n and "head_mlp_project's form" in n for n in plan.notes)
    red = next(e for e in plan.predicted if e.concept == "red")
    assert red.after == pytest.approx(0.0, abs=1e-6)
    one_sided = _plan(stack, Operation(["red"], target=0.0, operator="head_mlp_project"))
    assert plan.multipliers == one_sided.multipliers  # exactly head_mlp_project's edit
    amplify = _plan(stack, Operation(["red"], "amplify", target=1.5, operator="head_mlp_orthogonal"))
    assert {a.operator for a in amplify.affected} == {"head_mlp_project"}
    assert any("is for suppressing" in n for n in amplify.notes)


def test_heads_alone_cannot_remove_what_the_mlps_write_and_the_preview_says_so(stack):
    plan = _plan(stack, Operation(["red"], operator="head_project", target=0.0))
    red = next(e for e in plan.predicted if e.concept == "red")
    assert red.after > 0.0  # the MLPs' share stays
    warning = next(w for w in plan.warnings if w.startswith("[unreachable]"))
    assert "head_mlp_project" in warning and "not reachable" in warning


def test_a_concept_the_tower_defaults_to_is_flagged(stack, monkeypatch):
    """The prior correction: a concept the tower leans to with no evidence is aimed lower; when even
    presence 0 is not enough the preview carries a named [prior] warning."""
    loaded, dictionary, *_ = stack
    geometry = Geometry(stack[3], dictionary, stack[2], *tower_writers(loaded))
    scores = {c: geometry.prior_score(c, neighbours(dictionary, c)) for c in ("red", "blue", "green", "yellow")}
    leaning = max(scores, key=scores.get)
    assert scores[leaning] > 0
    plan = _plan(stack, Operation([leaning]))
    target = next(e for e in plan.predicted if e.concept == leaning)
    assert target.after < DEFAULT_SUPPRESS_TARGET - 1e-6  # aimed lower than the target
    monkeypatch.setattr(plan_module, "PRIOR_WEIGHT", 10.0)
    plan = _plan(stack, Operation([leaning]))
    assert any(w.startswith("[prior]") and leaning in w for w in plan.warnings)
    assert next(e for e in plan.predicted if e.concept == leaning).after == pytest.approx(0.0, abs=1e-9)


def test_unreachable_target_is_a_warning_in_the_preview_not_a_silent_no_op(stack):
    plan = _plan(stack, Operation(["red"], "suppress", layers=[0], target=0.0))
    assert any("not reachable" in w for w in plan.warnings)
    red = next(e for e in plan.predicted if e.concept == "red")
    assert 0.0 < red.after < 1.0  # it went as far as it could, and says so
    assert all(a.alpha == 0.0 for a in plan.affected)


def test_debias_is_a_suppress_with_its_own_default_target(stack):
    debias = _plan(stack, Operation(["red"], action="debias"))
    assert debias.spec.operations[0].target == pytest.approx(DEFAULT_DEBIAS_TARGET) != DEFAULT_SUPPRESS_TARGET
    suppress = _plan(stack, Operation(["red"], target=DEFAULT_DEBIAS_TARGET))
    for maps in (_head_maps, _mlp_maps):  # the same plan at the same target
        a, b = maps(debias), maps(suppress)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert debias.spec.operations[0].action == "debias"  # the request's intent is kept in the spec
    with pytest.raises(InvalidInput, match="debias needs a target presence") as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["water"], "action": "debias", "target": 1.2}]})
    assert err.value.field == "operations[0].target"
    with pytest.raises(InvalidInput, match="debiased by operations\\[0\\] and amplified here") as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["water"], "action": "debias"},
                                                         {"concepts": ["water"], "action": "amplify"}]})
    assert err.value.field == "operations[1].concepts[0]"


def test_bad_inputs_are_named(stack):
    with pytest.raises(InvalidInput) as err:
        _plan(stack, Operation(["red"], preserve=["bleu"]))
    assert err.value.field == "operations[0].preserve[0]" and "blue" in err.value.suggestions
    with pytest.raises(InvalidInput, match="contradictory") as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], "preserve": ["red"]}]})
    assert err.value.field == "operations[0].preserve[0]"
    with pytest.raises(InvalidInput, match="contradictory") as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"]},
                                                         {"concepts": ["red"], "action": "amplify"}]})
    assert err.value.field == "operations[1].concepts[0]"
    with pytest.raises(InvalidInput, match="contradictory") as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"]}, {"concepts": ["blue"], "preserve": ["red"]}]})
    assert err.value.field == "operations[1].preserve[0]"
    with pytest.raises(InvalidInput, match="contradictory") as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], "strength": 0.0, "target": 0.2,
                                                          "select": {"rule": "top_n", "n": 2}}]})
    assert err.value.field == "operations[0].target"
    for op, field in (({"target": 1.5}, "target"), ({"action": "amplify", "target": 0.5}, "target"),
                      ({"action": "flip", "target": 0.5}, "target"), ({"action": "scale", "strength": 0.5, "target": 0.2},
                                                                        "target"),
                      ({"preserve_neighbours": "yes"}, "preserve_neighbours"), ({"preserve": [""]}, "preserve[0]"),
                      ({"select": {"rule": "auto", "n": 3}}, "select")):
        with pytest.raises(InvalidInput) as err:
            EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], **op}]})
        assert err.value.field == f"operations[0].{field}", op
    with pytest.raises(InvalidInput, match="auto rule only"):
        _plan(stack, Operation(["red"], operator="output_projection", select=top_n(2)))


def test_spec_round_trip_with_the_new_fields():
    spec = EditSpec.from_dict({"model": "m", "operations": [
        {"concepts": ["red"]},
        {"concepts": ["water", "land"], "operator": "sith_scale", "target": 0.2, "preserve": ["sky"],
         "preserve_neighbours": False},
        {"concepts": ["circle"], "action": "amplify", "operator": "head_project", "target": 2.0},
        {"concepts": ["blue"], "action": "flip", "strength": -0.5}]})
    again = EditSpec.from_json(spec.to_json())
    assert again.to_dict() == spec.to_dict()
    ops = again.to_dict()["operations"]
    assert ops[0]["operator"] == "head_mlp_orthogonal" and ops[0]["target"] == DEFAULT_SUPPRESS_TARGET and ops[0]["select"] == {"rule": "auto"}
    assert ops[1]["preserve"] == ["sky"] and ops[1]["preserve_neighbours"] is False
    assert ops[2]["target"] == 2.0 and ops[3]["strength"] == -0.5 and ops[3]["target"] == -0.5


@pytest.mark.parametrize("family,changed", [("coca", ["visual.proj"]), ("clipa", ["visual.proj"]),
                                            ("hf-clip", ["hf.visual_projection.weight"]),
                                            ("eva02", ["visual.trunk.head.weight", "visual.trunk.head.bias"]),
                                            ("pe-core", ["visual.trunk.head.weight", "visual.trunk.head.bias"])])
def test_output_projection_goes_through_the_tower_adapter(family, changed):
    """On towers other than a plain CLIP ViT the output map is written as P ← P T through the adapter:
    the embedding becomes e T exactly and only the final projection changes."""
    from sith.edits.multipliers import WriteMap
    from test_engine_towers import build
    from test_engine_towers import images as tower_images

    model = build(family)
    x = tower_images(model)
    with torch.no_grad():
        before = model.encode_image(x, normalize=False).double()
    dim = before.shape[1]
    u = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(3)).double(), dim=0)
    mult = Multipliers({}, pairs=[(u, u)], maps=[WriteMap("output", -1, -1, 0, 0.25)])
    edited = apply_multipliers(model, mult, {})
    with torch.no_grad():
        after = edited.encode_image(x, normalize=False).double()
    t = mult.write_matrix("output")
    assert (after - before @ t).abs().max() < 1e-4 * before.abs().max()
    assert (before @ u).abs().max() > 1e-3 and torch.allclose(after @ u, 0.25 * (before @ u), atol=1e-4)
    diff = [n for (n, p0), p1 in zip(model.named_parameters(), edited.parameters()) if not torch.equal(p0, p1)]
    assert diff == changed


def test_output_projection_names_a_tower_without_a_final_projection():
    from sith.edits.multipliers import WriteMap
    from test_engine_towers import build

    model = build("siglip-timm")  # timm MAP head, timm_proj "none": the readout ends in the head itself
    u = torch.zeros(64, dtype=torch.float64)
    u[0] = 1.0
    mult = Multipliers({}, pairs=[(u, u)], maps=[WriteMap("output", -1, -1, 0, 0.5)])
    with pytest.raises(InvalidInput) as info:
        apply_multipliers(model, mult, {})
    assert info.value.field == "operator" and "timm" in info.value.reason and "output_projection" in info.value.reason


def test_mlp_rms_weights_match_a_monte_carlo_estimate(stack):
    """tower_writers' data-free RMS of each MLP hidden unit: the Gauss–Hermite value equals a sampled
    E[act(z)²]^½ for z ~ N(b + w·β, ‖w ⊙ γ‖²), and the rows are the adapter's MLP write matrix."""
    from sith.edits.operators import _rms_activation
    from sith.engine.towers import adapter_for

    loaded = stack[0]
    mlps, prior = tower_writers(loaded)
    tower = adapter_for(loaded.model)
    block = tower.blocks[1]
    weight = block.mlp.c_fc.weight.double()
    mean = block.mlp.c_fc.bias.double() + weight @ block.ln_2.bias.double()
    std = (weight * block.ln_2.weight.double()[None, :]).norm(dim=1)
    rms = _rms_activation(mean, std, block.mlp.gelu)
    z = mean[:, None] + std[:, None] * torch.randn(mean.shape[0], 200_000, generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.float64)
    sampled = (torch.nn.functional.gelu(z) ** 2).mean(dim=1).sqrt()
    assert torch.allclose(rms, sampled, rtol=2e-2)
    assert torch.allclose(mlps[1], tower.mlp_output(1).double() * rms[:, None], atol=1e-6)
    assert set(mlps) == {0, 1, 2} and prior is not None and prior.shape == (64,)
    visual = loaded.model.visual
    expected = visual.ln_pre((visual.class_embedding + visual.positional_embedding[0])[None]).reshape(-1)
    assert torch.allclose(prior, expected.double().detach(), atol=1e-6)  # read through the adapter


def test_an_anchored_map_rewrites_a_share_of_the_removal_along_the_anchor_and_reverts(stack):
    loaded, dictionary, decomposition, joint, _ = stack
    plain = _plan(stack, Operation(["red"], target=0.5, anchor="none"))
    plan = _plan(stack, Operation(["red"], target=0.5, anchor="blue"), anchor_weight=0.5)
    assert any("anchored to 'blue'" in n for n in plan.notes) and not any("anchored" in n for n in plain.notes)
    geometry = Geometry(joint, dictionary, decomposition, *tower_writers(loaded))
    blue = geometry.residual_direction("blue")
    (u, v), = plan.multipliers.pairs
    (u0, v0), = plain.multipliers.pairs
    assert torch.allclose(u, u0) and torch.allclose(v, v0 - 0.5 * blue / blue.norm())  # v ← v − κ â
    red = next(e for e in plan.predicted if e.concept == "red")
    prior = geometry.prior_score("red", preserved_concepts(plan.spec, 0, dictionary))
    assert red.after == pytest.approx(max(0.0, 0.5 - plan_module.PRIOR_WEIGHT * prior), abs=1e-6)  # α solved with it
    # the anchor changes where the removed share goes, not how much is removed: red's presence does
    # not count what is re-written along blue, so α is the unanchored plan's; blue's presence moves
    assert plan.affected[0].alpha == pytest.approx(plain.affected[0].alpha, abs=1e-9)
    blue_after = {e.concept: e.after for e in plan.predicted}.get("blue")
    plain_blue = {e.concept: e.after for e in plain.predicted}.get("blue")
    assert blue_after is not None and abs(blue_after - plain_blue) > 1e-3
    # what a writer loses along u is partly written along the anchor: w T = w − (1 − α)(w·u)(v0 − κ â)
    alpha = plan.affected[0].alpha
    t = plan.multipliers.write_matrix("mlp", LAYERS[0])
    assert torch.allclose(u @ t, u - (1 - alpha) * float(u @ u) * v, atol=1e-9)
    # written back exactly, through the manifest, and reverted through the inverse (Sherman–Morrison)
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    reference = _patched(loaded.model, _head_maps(plan), mlp_maps=_mlp_maps(plan))
    assert (_embed(edited) - _embed(reference)).abs().max() < 1e-5
    assert Multipliers.from_manifest(plan.manifest()["multipliers"]) == plan.multipliers
    inverse = plan.multipliers.inverse()
    assert torch.allclose(t @ inverse.write_matrix("mlp", LAYERS[0]), torch.eye(t.shape[0], dtype=torch.float64),
                          atol=1e-9)
    restored = apply_multipliers(loaded.model, plan.multipliers.compose(inverse), decomposition)
    assert (_embed(restored) - _embed(loaded.model)).abs().max() < 1e-5


def test_the_automatic_anchor_is_the_nearest_preserved_concept_of_a_default_removal(stack, monkeypatch):
    _, dictionary, _, _, _ = stack
    spec = EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"]}]})
    preserved = preserved_concepts(spec, 0, dictionary)
    centred = torch.nn.functional.normalize(dictionary.centred.double(), dim=-1)
    cosine = {c: float(centred[dictionary.index(c)] @ centred[dictionary.index("red")]) for c in preserved}
    nearest = max(cosine, key=cosine.get)
    monkeypatch.setattr(plan_module, "ANCHOR_MIN_COSINE", -1.0)
    assert plan_module.anchor_for(spec, 0, "red", preserved, dictionary) == nearest
    monkeypatch.setattr(plan_module, "ANCHOR_MIN_COSINE", 1.0)  # none close enough: no anchor
    assert plan_module.anchor_for(spec, 0, "red", preserved, dictionary) is None
    monkeypatch.setattr(plan_module, "ANCHOR_MIN_COSINE", -1.0)
    for op in ({"action": "debias"}, {"operator": "head_mlp_project"}, {"anchor": "none"}):
        other = EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], **op}]})
        assert plan_module.anchor_for(other, 0, "red", preserved, dictionary) is None, op
    explicit_anchor = EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], "anchor": "green"}]})
    assert plan_module.anchor_for(explicit_anchor, 0, "red", [], dictionary) == "green"
    with pytest.raises(InvalidInput) as err:
        _plan(stack, Operation(["red"], anchor="bleu"))
    assert err.value.field == "operations[0].anchor" and "blue" in err.value.suggestions


@pytest.mark.parametrize("op, field, reason", [
    ({"anchor": ""}, "operations[0].anchor", "expected a concept name"),
    ({"anchor": "red"}, "operations[0].anchor", "contradictory"),
    ({"anchor": "blue", "action": "amplify"}, "operations[0].anchor", "needs action suppress or debias"),
    ({"anchor": "blue", "operator": "sith_scale"}, "operations[0].anchor", "needs action suppress or debias"),
])
def test_bad_anchors_are_named(op, field, reason):
    with pytest.raises(InvalidInput, match=reason) as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], **op}]})
    assert err.value.field == field
    with pytest.raises(InvalidInput, match="anchor here but suppressed") as err:
        EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], "anchor": "blue"},
                                                         {"concepts": ["blue"]}]})
    assert err.value.field == "operations[0].anchor"
    spec = EditSpec.from_dict({"model": "m", "operations": [{"concepts": ["red"], "anchor": "blue"}]})
    assert EditSpec.from_dict(spec.to_dict()).operations[0].anchor == "blue"


def test_anchor_weight_is_checked(stack):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidInput) as err:
            _plan(stack, Operation(["red"]), anchor_weight=bad)
        assert err.value.field == "anchor_weight"
    with pytest.raises(InvalidInput, match="vᵀu"):
        u = torch.zeros(4, dtype=torch.float64)
        u[0] = 1.0
        Multipliers({}, pairs=[(u, 3.0 * u)], maps=[])
