"""Selection without an LLM, conflict rules and the dry-run preview, on a real (tiny) engine stack."""

from __future__ import annotations

import pytest
import torch

from edits_fixtures import CONCEPTS, plan_inputs, tiny_loaded
from sith.edits.apply import apply_multipliers
from sith.edits.plan import operation_layers, plan_from_vectors
from sith.edits.relevance import DictionaryJudge
from sith.edits.spec import EditSpec, Operation, explicit, threshold, top_n
from sith.engine.decomposition import decompose
from sith.engine.dictionary import build_dictionary
from sith.engine.errors import InvalidInput

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    loaded = tiny_loaded(tmp)
    dictionary = build_dictionary(loaded, CONCEPTS, cache_dir=tmp)
    decomposition, joint, vectors = plan_inputs(loaded, dictionary, LAYERS)
    return loaded, dictionary, decomposition, joint, vectors


def _plan(stack, *operations, conflicts="reject"):
    loaded, dictionary, decomposition, joint, vectors = stack
    spec = EditSpec(model="tiny", operations=list(operations), conflicts=conflicts).validate()
    return plan_from_vectors(spec, loaded.name, loaded.hash, decomposition, vectors,
                             operation_layers(loaded.info, spec), joint, dictionary)


def test_relevance_matches_the_documented_rule(stack):
    _, dictionary, _, _, vectors = stack
    judge = DictionaryJudge(dictionary)
    concepts = ["red", "water"]
    scores = judge.score(vectors, concepts)
    wanted = [dictionary.centred[dictionary.index(c)] for c in concepts]
    for pos in range(0, len(vectors), 7):
        r_comp = 0.0
        for name, coef in vectors.explanations[pos]:
            atom = dictionary.centred[dictionary.index(name)]
            r_comp += coef * max(0.0, max(float(atom @ w) for w in wanted))
        r_dir = max(abs(float(vectors.targets[pos] @ w)) for w in wanted)
        assert scores[pos] == pytest.approx(0.5 * r_comp + 0.5 * r_dir, abs=1e-5)


def test_top_n_selects_the_most_relevant_vectors_of_the_requested_layers(stack):
    _, dictionary, _, _, vectors = stack
    plan = _plan(stack, Operation(["red"], "suppress", operator="sith_scale", layers=[2], select=top_n(5)))
    scores = DictionaryJudge(dictionary).score(vectors, ["red"])
    in_layer = [i for i, k in enumerate(vectors.keys) if k[0] == 2]
    best = sorted(in_layer, key=lambda i: -float(scores[i]))[:5]
    assert {(a.layer, a.head, a.index) for a in plan.affected} == {vectors.keys[i] for i in best}
    assert plan.multipliers.changed() == sorted((*vectors.keys[i], 0.0) for i in best)
    assert torch.equal(plan.multipliers.values[1], torch.ones_like(plan.multipliers.values[1]))
    assert plan.to_dict() == _plan(stack, Operation(["red"], "suppress", operator="sith_scale", layers=[2], select=top_n(5))).to_dict()


def test_threshold_selects_everything_above_it(stack):
    _, dictionary, _, _, vectors = stack
    scores = DictionaryJudge(dictionary).score(vectors, ["circle"])
    cut = float(torch.quantile(scores, 0.9))
    plan = _plan(stack, Operation(["circle"], "amplify", 2.0, operator="sith_scale", select=threshold(cut)))
    assert len(plan.affected) == int((scores >= cut).sum())
    assert all(a.relevance >= cut and a.alpha == 2.0 for a in plan.affected)


def test_no_vector_above_threshold_is_an_error_not_a_silent_no_op(stack):
    with pytest.raises(InvalidInput, match="nothing was changed") as err:
        _plan(stack, Operation(["red"], "suppress", operator="sith_scale", select=threshold(50.0)))
    assert err.value.field == "operations[0].select.threshold"
    assert "the best is" in err.value.reason


def test_unknown_concept_suggests_dictionary_entries(stack):
    with pytest.raises(InvalidInput) as err:
        _plan(stack, Operation(["red"], "suppress", operator="sith_scale"), Operation(["watter"], "suppress", operator="sith_scale"))
    assert err.value.field == "operations[1].concepts[0]"
    assert "water" in err.value.suggestions


def test_two_operations_on_one_vector_are_rejected_naming_both(stack):
    red = Operation(["red"], "suppress", operator="sith_scale", select=explicit([(2, 0, 1), (2, 1, 1)]))
    blue = Operation(["blue"], "amplify", 2.0, operator="sith_scale", select=explicit([(2, 1, 1)]))
    with pytest.raises(InvalidInput, match=r"operations\[0\].*operations\[1\]") as err:
        _plan(stack, red, blue)
    assert err.value.field == "operations[1]"
    plan = _plan(stack, red, blue, conflicts="last_wins")
    assert plan.multipliers.values[2][1, 1] == 2.0 and plan.multipliers.values[2][0, 1] == 0.0
    assert len(plan.notes) == 1 and "last_wins" in plan.notes[0]


def test_explicit_vector_outside_the_analysis_is_named(stack):
    with pytest.raises(InvalidInput) as err:
        _plan(stack, Operation(["red"], "suppress", operator="sith_scale", layers=[2], select=explicit([(1, 0, 0)])))
    assert err.value.field == "operations[0].select.vectors[0]"
    with pytest.raises(InvalidInput) as err:
        _plan(stack, Operation(["red"], "suppress", operator="sith_scale", layers=[7]))
    assert err.value.field == "operations[0].layers"


def test_preview_matches_what_apply_does(stack):
    loaded, dictionary, decomposition, joint, _ = stack
    plan = _plan(stack, Operation(["red", "blue"], "suppress", operator="sith_scale", layers=[2], select=top_n(6)),
                 Operation(["forest"], "scale", 0.5, operator="sith_scale", layers=[1], select=top_n(3)))
    edited = apply_multipliers(loaded.model, plan.multipliers, decomposition)
    before, after = decompose(loaded, LAYERS), decompose(type(loaded)(edited, loaded.tokenizer, "e", "",
                                                                          loaded.info, None), LAYERS)
    for change in plan.heads:
        s_before = before[change.layer].S[change.head].double()
        s_after = after[change.layer].S[change.head].double()
        assert change.energy_before == pytest.approx(float((s_before**2).sum()), rel=1e-5)
        assert change.energy_after == pytest.approx(float((s_after**2).sum()), rel=1e-4)
        assert change.energy_after < change.energy_before
    for row in plan.concept_alignment:
        y = joint.inverse(dictionary.centred[dictionary.index(row.concept)][None]).double()[0]
        svd = after[row.layer]
        recomputed = float((svd.S[row.head].double() * (y @ svd.V[row.head].double())).norm())
        assert row.after == pytest.approx(recomputed, rel=1e-3, abs=1e-6)
        assert row.after <= row.before + 1e-9


def test_plan_edit_through_the_analyzer_matches_the_component_path(stack, tmp_path):
    from sith.edits.plan import plan_edit
    from sith.engine.analysis import Analyzer

    loaded, dictionary, *_ = stack
    analyzer = Analyzer(loaded, dictionary)
    spec = EditSpec(model="tiny", operations=[Operation(["red", "water"], "suppress", operator="sith_scale", layers=LAYERS, select=top_n(6))])
    via_analyzer = plan_edit(analyzer, spec)
    direct = _plan(stack, Operation(["red", "water"], "suppress", operator="sith_scale", layers=LAYERS, select=top_n(6)))
    assert [(a.layer, a.head, a.index) for a in via_analyzer.affected] == \
           [(a.layer, a.head, a.index) for a in direct.affected]
    assert via_analyzer.multipliers == direct.multipliers
    assert via_analyzer.multipliers.model_hash == loaded.hash
    assert via_analyzer.manifest()["multipliers"]["changed"] == [list(c) for c in direct.multipliers.changed()]


class _SigmaJudge:
    """An external judge stand-in with a different, easily checked rule: relevance = σ."""

    name = "sigma-judge"

    def score(self, vectors, concepts):
        return vectors.sigma.clone()


def test_an_external_judge_plugs_in(stack):
    loaded, dictionary, decomposition, joint, vectors = stack
    spec = EditSpec(model="tiny", operations=[Operation(["anything at all"], "suppress", operator="sith_scale", layers=[2],
                                                        select=top_n(2))]).validate()
    plan = plan_from_vectors(spec, loaded.name, loaded.hash, decomposition, vectors,
                             operation_layers(loaded.info, spec), joint, dictionary, judge=_SigmaJudge())
    strongest = sorted((i for i, k in enumerate(vectors.keys) if k[0] == 2), key=lambda i: -float(vectors.sigma[i]))[:2]
    assert {(a.layer, a.head, a.index) for a in plan.affected} == {vectors.keys[i] for i in strongest}
    assert plan.manifest()["judge"] == "sigma-judge" and plan.concept_alignment == []


def test_other_concepts_are_everything_outside_the_edited_factor_and_its_relatives(stack):
    from sith.edits.plan import NEIGHBOUR_MIN_COSINE, other_concepts, preserved_concepts

    _, dictionary, _, _, _ = stack
    spec = EditSpec(model="tiny", operations=[Operation(["red"]), Operation(["circle"], preserve=["boat"])]).validate()
    centred = torch.nn.functional.normalize(dictionary.centred.double(), dim=1)
    for i, (concept, factor) in enumerate((("red", {"red", "blue", "green", "yellow"}),
                                           ("circle", {"circle", "square", "triangle", "star"}))):
        preserved = preserved_concepts(spec, i, dictionary)
        others = other_concepts(spec, i, dictionary, preserved)
        assert others, concept
        assert not set(others) & (factor | set(preserved) | {"red", "circle"})  # own factor, preserved, edited
        own = centred[dictionary.index(concept)]
        for c in others:
            assert float(centred[dictionary.index(c)] @ own) < NEIGHBOUR_MIN_COSINE  # nothing related to it
        left_out = [c for c in dictionary.concepts if c not in others]
        for c in left_out:  # and everything else is in
            assert (c in factor or c in preserved or c in ("red", "circle")
                    or float(centred[dictionary.index(c)] @ own) >= NEIGHBOUR_MIN_COSINE), (concept, c)
