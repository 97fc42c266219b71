"""From an EditSpec to a concrete edit, plus the dry-run preview of what it would change.

Planning never touches weights. Per operation it resolves the concepts to preserve (explicit +
dictionary neighbours), picks writers (singular vectors, heads, heads + MLPs, or the output
projection, by operator) and strengths, either by the selection rule (expert override) or
target-driven: until the concept's data-free predicted presence (operators.predicted_presence)
reaches the target (for the head projections: the target corrected by the concept's prior,
``_Planner.target_for``; an anchor's re-write is not counted as the edited concept's presence,
``_Planner.unanchored_pairs``). The preview reports per writer (α, share, explanation, operator), per head
(spectral energy), the predicted presence of every edited and preserved concept, and tagged
warnings ([unreachable] target, [prior] default concept, [preserve] a preserved concept predicted
to move) before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sith.edits.multipliers import Multipliers, WriteMap
from sith.edits.operators import (PROJECTIONS, Geometry, orthogonal_pair, predicted_presence, preserving_pair,
                                  solve_uniform_alpha, tower_writers)
from sith.edits.relevance import DictionaryJudge, Judge, VectorSet, select
from sith.edits.spec import MAX_ABS_STRENGTH, SUPPRESSING, EditSpec, Operation, default_strength, range_action, top_n
from sith.engine.decomposition import LayerSVD, resolve_layers
from sith.engine.errors import InvalidInput

EXPLANATION_K = 5
# Neighbours rule (see ``neighbours``).
NEIGHBOURS_K = 8
NEIGHBOUR_MIN_COSINE = 0.3
SYNONYM_COSINE = 0.85
# λ of head_mlp_project / head_project / output_projection (operators.preserving_pair), chosen on
# validation seeds with the default target and prior weight (docs/edits.md, "Frontier": λ = 2 beat
# 1 and 0.5 on the validation rule, mean and worst case over both testbed models and four tasks).
DEFAULT_PRESERVE_WEIGHT = 2.0
# λ of head_mlp_orthogonal's symmetric map (operators.orthogonal_pair). Chosen on validation seeds
# (experiments/retention_variants.py, head_mlp_orthogonal rows: λ ∈ {1, 2} × target ∈ {0.2, 0.1, 0.0}):
# λ = 2 missed red's removal on testbed-main at the default target (15.6 % recall), and the lower
# targets kept less of everything else at either λ.
ORTHOGONAL_PRESERVE_WEIGHT = 1.0
# λ_o: the second, weaker preservation term of the same operators for every *other* dictionary
# concept (``other_concepts``), weighted by their second-moment matrix (operators.preserving_pair),
# so it means the same for any vocabulary size. Beyond the paper (UCE-style). Off by default: on
# validation seeds no λ_o > 0 beat 0 (it moves the damage from the other factors into the edited
# factor's other values and costs the water/land debias its gain; docs/edits.md, "Frontier",
# experiments/preserve_others_sweep.py).
DEFAULT_PRESERVE_OTHERS_WEIGHT = 0.0
# κ of an anchored map (``anchor_for``; beyond the paper, UCE-style): the share of what a projection
# removes along the concept that it re-writes along the anchor concept's direction,
# T = I − (1 − α) u (v − κ â)ᵀ. Mapping "red" partly onto "orange" keeps the colours that are mixtures
# with red (orange ≈ red + yellow, pink ≈ red + white) from falling into their other component.
# Chosen on validation seeds with the default target (experiments/frontier.py, ``default_target_choice``).
ANCHOR_WEIGHT = 0.25
# An automatic anchor must be at least this close (centred cosine) to the concept.
ANCHOR_MIN_COSINE = NEIGHBOUR_MIN_COSINE
# A preserved concept whose predicted presence moves by more than this is reported in the warnings.
PRESERVE_WARNING = 0.10
# Prior correction of a suppress target (docs/edits.md, "Predicted presence"): the planner aims at
# target − PRIOR_WEIGHT · prior, prior = operators.Geometry.prior_score (cosine in [−1, 1]) of the
# concept against its preserved concepts. Chosen on validation seeds (experiments/frontier.py).
PRIOR_WEIGHT = 1.2


@dataclass
class AffectedVector:
    """One changed writer. sith_scale/head_ablation: a singular vector (σ, α on it). head_project:
    a head (index −1; sigma and relevance = the head's share of the concept's write capacity; α =
    the factor on the concept's component); head_mlp_project also lists each block's MLP (head =
    index = −1). output_projection: visual.proj (layer = head = −1)."""

    layer: int
    head: int
    index: int
    sigma: float
    alpha: float
    relevance: float
    operation: int
    concepts: list[tuple[str, float]]
    operator: str = "sith_scale"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "index": self.index, "sigma": self.sigma,
                "alpha": self.alpha, "relevance": self.relevance, "operation": self.operation,
                "concepts": [[c, w] for c, w in self.concepts], "operator": self.operator}


@dataclass
class ConceptEffect:
    """Data-free predicted presence of a concept (operators.predicted_presence) before and after."""

    concept: str
    role: str  # "target" | "preserve"
    before: float
    after: float

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "role": self.role, "before": self.before, "after": self.after}


@dataclass
class HeadChange:
    """Spectral energy Σσ² of a head before and after the edit (the share of its write it keeps)."""

    layer: int
    head: int
    vectors: int
    energy_before: float
    energy_after: float

    @property
    def energy_ratio(self) -> float:
        return self.energy_after / self.energy_before if self.energy_before > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "vectors": self.vectors, "energy_before": self.energy_before,
                "energy_after": self.energy_after, "energy_ratio": self.energy_ratio}


@dataclass
class ConceptAlignment:
    """‖diag(σ) Vᵀ y_c‖ (how much the head can write along concept c's residual direction y_c =
    pinv(P)-mapped centred text embedding, spec §1.8) before and after the edit."""

    concept: str
    operation: int
    layer: int
    head: int
    before: float
    after: float

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "operation": self.operation, "layer": self.layer, "head": self.head,
                "before": self.before, "after": self.after, "ratio": self.ratio}


@dataclass
class EditPlan:
    spec: EditSpec
    model_name: str
    model_hash: str
    judge: str
    multipliers: Multipliers
    affected: list[AffectedVector]
    heads: list[HeadChange]
    concept_alignment: list[ConceptAlignment]
    decomposition: dict[int, LayerSVD] = field(repr=False, default_factory=dict)
    notes: list[str] = field(default_factory=list)
    predicted: list[ConceptEffect] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "model": {"name": self.model_name, "hash": self.model_hash},
            "judge": self.judge,
            "affected": [a.to_dict() for a in self.affected],
            "heads": [h.to_dict() for h in self.heads],
            "concept_alignment": [c.to_dict() for c in self.concept_alignment],
            "notes": list(self.notes),
            "predicted": [e.to_dict() for e in self.predicted],
            "warnings": list(self.warnings),
        }

    def manifest(self) -> dict[str, Any]:
        """What an exported checkpoint records about its edit (see export.py)."""
        return {
            "base_model": self.model_name,
            "base_hash": self.model_hash,
            "spec": self.spec.to_dict(),
            "judge": self.judge,
            "affected": [a.to_dict() for a in self.affected],
            "heads": [h.to_dict() for h in self.heads],
            "predicted": [e.to_dict() for e in self.predicted],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "multipliers": self.multipliers.to_manifest(),
        }


# ------------------------------------------------------------------------------------------------
# Candidate vectors


def vector_set(decomposition: dict[int, LayerSVD], targets: dict[int, Tensor], codes: dict[int, Any],
               dictionary) -> VectorSet:
    """Flatten the analysed layers into candidates (head-major per layer, as the Analyzer stores them).

    ``targets[layer]`` is [H·r, D] (spec §1.7), ``codes[layer]`` a ``SparseCodes`` of the same rows.
    """
    keys, sigma, all_targets, idx, coef, names = [], [], [], [], [], []
    for layer in sorted(decomposition):
        svd = decomposition[layer]
        heads, rank = svd.S.shape
        keys.extend((layer, h, j) for h in range(heads) for j in range(rank))
        sigma.append(svd.S.reshape(-1).float().cpu())
        all_targets.append(targets[layer].float().cpu())
        layer_idx = codes[layer].indices.cpu()
        layer_coef = codes[layer].coefficients.float().cpu()
        layer_idx = torch.where(layer_coef > 0, layer_idx, torch.full_like(layer_idx, -1))
        idx.append(layer_idx)
        coef.append(layer_coef.clamp(min=0))
        for row_idx, row_coef in zip(layer_idx.tolist(), layer_coef.tolist()):
            names.append([(dictionary.concepts[i], round(c, 6)) for i, c in zip(row_idx, row_coef) if i >= 0])
    return VectorSet(keys=keys, sigma=torch.cat(sigma), targets=torch.cat(all_targets),
                     code_indices=torch.cat(idx), code_coefficients=torch.cat(coef), explanations=names)


def operation_layers(info, spec: EditSpec) -> list[list[int]]:
    """Each operation's layers. Default: every layer for the target-driven and head operators (the
    concept is usually written across the tower), the last four for sith_scale with an explicit
    rule (the paper's setting)."""
    out = []
    for i, op in enumerate(spec.operations):
        layers = op.layers
        if layers is None and (op.operator != "sith_scale" or op.select.rule == "auto"):
            layers = list(range(info.layers))
        try:
            out.append(resolve_layers(info, layers))
        except InvalidInput as exc:
            raise InvalidInput(f"operations[{i}].layers", exc.reason) from None
    return out


# ------------------------------------------------------------------------------------------------
# Planning


def _concept_directions(joint, dictionary, concepts: Sequence[str]) -> Tensor:
    """Residual-width directions y_c [C, d] of the concepts (spec §1.8 inverse of the centred embedding)."""
    rows = torch.tensor([dictionary.index(c) for c in concepts])
    return joint.inverse(dictionary.centred[rows].float()).double().cpu()


def _known(dictionary, concepts: Sequence[str], field: str) -> None:
    """Unknown names fail with the closest dictionary entries as suggestions."""
    for j, concept in enumerate(concepts):
        try:
            dictionary.index(concept)
        except InvalidInput as exc:
            suggestions = exc.suggestions or dictionary.closest(concept, 5)
            raise InvalidInput(f"{field}[{j}]", f"unknown concept {concept!r}: not in the dictionary",
                               suggestions=suggestions) from None


def _centred_cosines(dictionary, concept: str) -> Tensor:
    """[N] centred cosine of every dictionary concept with ``concept`` (the rows are unit vectors)."""
    centred = dictionary.centred.double()
    return centred @ centred[dictionary.index(concept)]


def neighbours(dictionary, concept: str, k: int = NEIGHBOURS_K) -> list[str]:
    """The dictionary neighbours a plan preserves by default (docs/edits.md, "Preservation").

    1. A concept that names a value of a known factor (the world factors: colours, shapes,
       backgrounds, textures, sizes, positions, counts) -> the other values of that factor that are
       in the dictionary;
    2. otherwise the ``k`` concepts nearest by centred cosine, if at least NEIGHBOUR_MIN_COSINE.
    Near-synonyms (centred cosine >= SYNONYM_COSINE, e.g. a plural) are never preserved: they are
    the same concept to the model.
    """
    from sith.testbed.vocabulary import testbed_categories

    sims = _centred_cosines(dictionary, concept)
    known = set(dictionary.concepts)
    out: list[str] = []
    for factor, words in testbed_categories().items():
        if factor != "group" and concept in words:
            out = [w for w in words if w != concept and w in known]
            break
    if not out:
        order = torch.argsort(-sims, stable=True).tolist()
        out = [dictionary.concepts[i] for i in order
               if dictionary.concepts[i] != concept and float(sims[i]) >= NEIGHBOUR_MIN_COSINE][:k]
    return [w for w in out if float(sims[dictionary.index(w)]) < SYNONYM_COSINE]


def preserved_concepts(spec: EditSpec, i: int, dictionary) -> list[str]:
    """Explicit ``preserve`` plus, unless turned off, the neighbours of the operation's concepts,
    minus every concept some operation of the spec edits."""
    op = spec.operations[i]
    _known(dictionary, op.concepts, f"operations[{i}].concepts")
    _known(dictionary, op.preserve, f"operations[{i}].preserve")
    edited = {c for o in spec.operations for c in o.concepts}
    out = list(op.preserve)
    if op.preserve_neighbours:
        for concept in op.concepts:
            out.extend(neighbours(dictionary, concept))
    return [c for c in dict.fromkeys(out) if c not in edited]


def anchor_for(spec: EditSpec, i: int, concept: str, preserved: Sequence[str], dictionary) -> str | None:
    """The concept that takes over part of what operation ``i`` removes along ``concept``, or None.

    An explicit ``anchor`` is used as given (an unknown name fails with suggestions). "auto" anchors
    only the default removal (action suppress, operator head_mlp_orthogonal): the preserved concept
    nearest to ``concept`` by centred cosine, if at least ANCHOR_MIN_COSINE (red → orange on the
    testbed). A debias, another operator or "none" gets no anchor.
    """
    op = spec.operations[i]
    if op.anchor == "none":
        return None
    if op.anchor != "auto":
        try:
            _known(dictionary, [op.anchor], f"operations[{i}].anchor")
        except InvalidInput as exc:
            raise InvalidInput(f"operations[{i}].anchor", exc.reason, exc.suggestions) from None
        return op.anchor
    if op.action != "suppress" or op.operator != "head_mlp_orthogonal":
        return None
    edited = {c for o in spec.operations for c in o.concepts}
    candidates = [c for c in preserved if c not in edited]
    if not candidates:
        return None
    sims = _centred_cosines(dictionary, concept)
    cosine = {c: float(sims[dictionary.index(c)]) for c in candidates}
    best = max(candidates, key=lambda c: (cosine[c], c))
    return best if cosine[best] >= ANCHOR_MIN_COSINE else None


def other_concepts(spec: EditSpec, i: int, dictionary, preserved: Sequence[str]) -> list[str]:
    """The concepts the second, weaker preservation term protects (``preserve_others_weight``):
    every dictionary concept that is not edited by the spec, not already preserved, not a value of
    an edited concept's own factor (a world factor of ``testbed_categories``; shape and its
    round/angular group count as one factor), and not related to an edited concept (centred
    cosine >= NEIGHBOUR_MIN_COSINE, which also drops near-synonyms such as a plural)."""
    from sith.testbed.vocabulary import testbed_categories

    op = spec.operations[i]
    edited = {c for o in spec.operations for c in o.concepts}
    skip = set(edited) | set(preserved)
    categories = testbed_categories()
    for concept in op.concepts:
        for factor, words in categories.items():
            if concept in words:
                tied = {"shape", "group"} if factor in ("shape", "group") else {factor}
                for f in tied:
                    skip.update(categories[f])
    centred = dictionary.centred.double()
    centred = centred / centred.norm(dim=1, keepdim=True).clamp(min=1e-12)
    own = centred[[dictionary.index(c) for c in op.concepts]]
    related = (centred @ own.T).max(dim=1).values
    return [c for j, c in enumerate(dictionary.concepts)
            if c not in skip and float(related[j]) < NEIGHBOUR_MIN_COSINE]


def _weight(field: str, value) -> float:
    """A preservation weight: a finite number >= 0, else InvalidInput naming the field."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(field, f"must be a number >= 0, got {value!r}") from None
    if isinstance(value, bool) or not (out >= 0.0) or out == float("inf"):
        raise InvalidInput(field, f"must be a finite number >= 0, got {value!r}")
    return out


def _writer_map(layer: int, head: int, pair: int, alpha: float) -> WriteMap:
    """The write map of a head (head >= 0) or of block ``layer``'s MLP (head = -1)."""
    return WriteMap("head" if head >= 0 else "mlp", layer, head, pair, alpha)


def _meets(action: str, presence: float, target: float) -> bool:
    return presence <= target + 1e-9 if action in (*SUPPRESSING, "flip") else presence >= target - 1e-9


class _Planner:
    """Turns each operation into α entries and write maps on one shared Multipliers."""

    def __init__(self, spec: EditSpec, decomposition, vectors: VectorSet | None, layers_per_op, joint, dictionary,
                 judge: Judge, geometry: Geometry, preserve_weight: float,
                 preserve_others_weight: float = DEFAULT_PRESERVE_OTHERS_WEIGHT,
                 anchor_weight: float = ANCHOR_WEIGHT) -> None:
        self.spec, self.decomposition, self.vectors = spec, decomposition, vectors
        self.layers_per_op, self.joint, self.dictionary, self.judge = layers_per_op, joint, dictionary, judge
        self.geometry, self.preserve_weight = geometry, preserve_weight
        self.preserve_others_weight, self.anchor_weight = preserve_others_weight, anchor_weight
        self.values = {layer: torch.ones_like(svd.S, dtype=torch.float32).cpu() for layer, svd in decomposition.items()}
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.anchor_shift: dict[int, Tensor] = {}  # pair index -> κ â, what _anchor took off its v
        self.maps: list[WriteMap] = []
        self.owner: dict[tuple[int, int, int], int] = {}
        self.affected: dict[tuple, AffectedVector] = {}
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.aimed: dict[tuple[int, str], float] = {}  # (operation, concept) -> the presence aimed at

    # ------------------------------------------------------------------ shared helpers

    def multipliers(self, model_hash: str | None = None, anchored: bool = True) -> Multipliers:
        """The edit as written; ``anchored=False``: without its anchors' re-write (``unanchored_pairs``)."""
        return Multipliers(self.values, model_hash, self.pairs if anchored else self.unanchored_pairs(), self.maps)

    def unanchored_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """The pairs without their anchors' re-write: what the edited concepts' presence is measured on
        (what an anchor writes along its own concept is not the edited concept's presence)."""
        return [(u, v + self.anchor_shift[i]) if i in self.anchor_shift else (u, v)
                for i, (u, v) in enumerate(self.pairs)]

    def presence(self, concepts: Sequence[str], extra_values=None, extra_maps=None) -> dict[str, float]:
        """Predicted presence of the concepts being edited (anchors not counted)."""
        values = self.values if extra_values is None else extra_values
        maps = self.maps + (extra_maps or [])
        return predicted_presence(self.geometry, Multipliers(values, None, self.unanchored_pairs(), maps), concepts)

    def _claim(self, i: int, key: tuple[int, int, int], alpha: float, relevance: float, operator: str,
               explanation: list) -> None:
        if key in self.owner:
            prev = self.spec.operations[self.owner[key]]
            op = self.spec.operations[i]
            layer, head, index = key
            if self.spec.conflicts == "reject":
                raise InvalidInput(f"operations[{i}]", f"conflict: layer {layer} head {head} vector {index} is "
                                   f"selected by operations[{self.owner[key]}] ({prev.action} {prev.concepts}) and "
                                   f"by operations[{i}] ({op.action} {op.concepts}); narrow a selection or set "
                                   "conflicts='last_wins'")
            self.notes.append(f"layer {layer} head {head} vector {index}: operations[{i}] overrides "
                              f"operations[{self.owner[key]}] (last_wins)")
        self.owner[key] = i
        self.values[key[0]][key[1], key[2]] = alpha
        svd = self.decomposition[key[0]]
        self.affected[("v", *key)] = AffectedVector(*key, float(svd.S[key[1], key[2]]), alpha, relevance, i,
                                                    explanation, operator)

    def _heads(self, i: int, mlps: bool = False) -> list[tuple[int, int]]:
        """The operation's candidate heads (layer, h), plus its blocks' MLPs (layer, −1) if ``mlps``."""
        heads = self.decomposition[next(iter(self.decomposition))].S.shape[0]
        out = [(layer, h) for layer in self.layers_per_op[i] for h in range(heads)]
        if mlps:
            out += [(layer, -1) for layer in self.layers_per_op[i] if layer in self.geometry.mlp]
        return out

    def target_for(self, i: int, op: Operation, concept: str, preserve: list[str]) -> float:
        """The presence the planner aims at: a suppress target lowered by the concept's prior (a concept
        the tower leans to without evidence must lose more of its writes), never below 0."""
        target = float(op.target)
        if op.action not in SUPPRESSING:
            return target
        prior = self.geometry.prior_score(concept, preserve)
        aimed = target - PRIOR_WEIGHT * prior
        if abs(aimed - target) > 1e-9:
            self.notes.append(f"operations[{i}]: {concept!r} leans {prior:+.2f} towards itself against "
                              f"{len(preserve)} preserved concept(s) with no image evidence (prior); target "
                              f"presence {target:g} aimed at {max(0.0, min(aimed, 0.99)):.3f}")
        if aimed < 0:
            self.warnings.append(f"[prior] operations[{i}]: {concept!r} is the tower's default among its neighbours "
                                 f"(prior {prior:+.2f}): removing everything it writes may still leave it "
                                 "recognised; the plan removes all it can, check the effect on data")
        aimed = max(0.0, min(aimed, 0.99))
        self.aimed[(i, concept)] = aimed
        return aimed

    def _unreachable(self, i: int, op: Operation, best: float, why: str, aimed: float | None = None) -> None:
        goal = f"{op.target:g}" if aimed is None or abs(aimed - op.target) < 1e-9 else \
            f"{op.target:g} (aimed at {aimed:.3f} for the prior)"
        hint = " (head_mlp_project also edits the MLPs)" if op.operator == "head_project" else ""
        self.warnings.append(f"[unreachable] operations[{i}]: target presence {goal} for {op.concepts} is not "
                             f"reachable with {op.operator} ({why}); the plan goes as far as it can: predicted "
                             f"{best:.3f}. Try more layers or another operator{hint}")

    def _strength(self, op: Operation) -> float:
        if op.strength is not None:
            return float(op.strength)
        value = default_strength(op.action)
        return 1.0 if value is None else float(value)

    # ------------------------------------------------------------------ operators

    def plan(self, i: int, op: Operation, preserve: list[str]) -> None:
        if op.operator == "sith_scale":
            self._sith_scale(i, op, preserve)
        elif op.operator == "head_ablation":
            self._head_ablation(i, op, preserve)
        elif op.operator in PROJECTIONS:
            self._head_project(i, op, preserve)
        else:
            self._output_projection(i, op, preserve)

    def _pair(self, u: Tensor, keep: list[Tensor], others: list[Tensor] | None = None, form=None,
              weight: float | None = None) -> int:
        """Store the (u, v) pair ``form`` builds (default operators.preserving_pair; orthogonal_pair) with
        λ = ``weight`` (default: the planner's) and λ_o; return its index."""
        stacked = torch.stack(keep, dim=1) if keep else None
        rest = torch.stack(others, dim=1) if others else None
        lam = self.preserve_weight if weight is None else weight
        self.pairs.append((form or preserving_pair)(u, stacked, lam, rest, self.preserve_others_weight))
        return len(self.pairs) - 1

    def _anchor(self, i: int, op: Operation, concept: str, preserve: list[str], pair: int) -> str | None:
        """Re-write a share κ (``anchor_weight``) of what pair ``pair`` removes along the anchor's direction
        (``anchor_for``): v ← v − κ â. Returns the plan's note for ``_add_maps`` (None: no anchor, or κ = 0)."""
        anchor = anchor_for(self.spec, i, concept, preserve, self.dictionary)
        if anchor is None or self.anchor_weight <= 0:
            return None
        direction = self.geometry.residual_direction(anchor)
        u, v = self.pairs[pair]
        self.anchor_shift[pair] = self.anchor_weight * direction / direction.norm()
        self.pairs[pair] = (u, v - self.anchor_shift[pair])
        return (f"operations[{i}]: {concept!r} is anchored to {anchor!r}: a share {self.anchor_weight:g} of what the "
                f"maps remove is re-written along the direction of {anchor!r}")

    def _other_directions(self, i: int, preserve: list[str], joint_space: bool) -> list[Tensor]:
        """The other concepts' directions (``other_concepts``); none when λ_o = 0."""
        if self.preserve_others_weight <= 0:
            return []
        direction = self.geometry.joint_direction if joint_space else self.geometry.residual_direction
        return [direction(c) for c in other_concepts(self.spec, i, self.dictionary, preserve)]

    def _keep_directions(self, op: Operation, concept: str, preserve: list[str], joint_space: bool) -> list[Tensor]:
        """Preserved concepts' directions, plus the operation's other concepts (so that one concept's
        map does not undo another's)."""
        direction = self.geometry.joint_direction if joint_space else self.geometry.residual_direction
        return [direction(c) for c in [*preserve, *[c for c in op.concepts if c != concept]]]

    def _head_project(self, i: int, op: Operation, preserve: list[str]) -> None:
        with_mlps = op.operator != "head_project"
        if with_mlps and not self.geometry.mlp and not self.geometry.model_known:
            raise InvalidInput(f"operations[{i}].operator", f"{op.operator} needs the blocks' MLP outputs, and "
                               "this plan was given no model; use head_project")
        if with_mlps and not self.geometry.mlp:
            # The default operator must work on every tower: where no block exposes an MLP output the
            # adapter can fold, the edit falls back to the heads, and says so.
            self.warnings.append(f"[no-mlp] operations[{i}]: no block of this tower exposes MLP output weights "
                                 f"the adapter can fold, so {op.operator} edits the attention heads only, "
                                 "as head_project does")
            with_mlps = False
        candidates = self._heads(i, mlps=with_mlps)
        others = self._other_directions(i, preserve, joint_space=False)
        for concept in op.concepts:
            u = self.geometry.residual_direction(concept)
            keep = self._keep_directions(op, concept, preserve, joint_space=False)
            share = self.geometry.head_share(u)
            ranked = sorted(candidates, key=lambda lh: (-share[lh], lh))
            ranked = [lh for lh in ranked if share[lh] > 0]
            target = self.target_for(i, op, concept, preserve) if op.target is not None else None
            if op.operator == "head_mlp_orthogonal" and self._orthogonal(i, op, concept, u, keep, others, ranked,
                                                                         share, target, preserve):
                continue
            pair = self._pair(u, keep, others)
            anchored = self._anchor(i, op, concept, preserve, pair)
            chosen, alpha = self._writers_and_alpha(i, op, ranked, share, target)
            if not chosen:
                continue
            form = "head_mlp_project" if op.operator == "head_mlp_orthogonal" else op.operator
            self._add_maps(i, form, concept, chosen, pair, alpha, share, anchored)

    def _add_maps(self, i: int, form: str, concept: str, writers: list[tuple[int, int]], pair: int,
                  alpha: float, share: dict, anchored: str | None = None) -> None:
        """One map per writer; ``form`` is the operator whose map it is (the preview's operator column);
        ``anchored`` is the note of an anchored pair (``_anchor``)."""
        if anchored:
            self.notes.append(anchored)
        for layer, head in writers:
            self.maps.append(_writer_map(layer, head, pair, alpha))
            self.affected[("h", layer, head, len(self.maps))] = AffectedVector(
                layer, head, -1, share[(layer, head)], alpha, share[(layer, head)], i, [(concept, 1.0)], form)

    def _orthogonal(self, i: int, op: Operation, concept: str, u: Tensor, keep: list[Tensor], others: list[Tensor],
                    ranked: list[tuple[int, int]], share: dict, target: float | None, preserve: list[str]) -> bool:
        """head_mlp_orthogonal's symmetric map on every ranked writer, α solved on the predicted
        presence; False (nothing added, a note says why) where head_mlp_project's form must do it."""
        if op.action not in SUPPRESSING or op.select.rule != "auto" or op.strength is not None or target is None:
            self.notes.append(f"operations[{i}]: {concept!r}: head_mlp_orthogonal's symmetric map is for suppressing "
                              "with the planner's writers and strength; this operation uses head_mlp_project's form")
            return False
        if not ranked:
            return False  # _writers_and_alpha raises the "no head writes along" error
        pair = self._pair(u, keep, others, orthogonal_pair, ORTHOGONAL_PRESERVE_WEIGHT)
        anchored = self._anchor(i, op, concept, preserve, pair)

        def presence(alpha: float) -> float:
            maps = [_writer_map(layer, h, pair, alpha) for layer, h in ranked]
            return self.presence([concept], extra_maps=maps)[concept]

        # the presence is affine in α: a write keeps w − (1 − α)(w·v̂)v̂ of itself
        floor, untouched = presence(0.0), presence(1.0)
        if floor > target + 1e-9 or untouched - floor <= 1e-12:
            self.pairs.pop()
            self.anchor_shift.pop(pair, None)
            self.notes.append(f"operations[{i}]: {concept!r}: the symmetric map reaches presence {floor:.3f} at "
                              f"most (aimed {target:.3f}); this concept uses head_mlp_project's form")
            return False
        alpha = min((target - floor) / (untouched - floor), 1.0)
        self._add_maps(i, op.operator, concept, ranked, pair, alpha, share, anchored)
        return True

    def _writers_and_alpha(self, i: int, op: Operation, ranked: list[tuple[int, int]],
                           share: dict, aimed: float | None = None) -> tuple[list[tuple[int, int]], float]:
        """Head writers and the factor α they apply along ĝ. presence = 1 − (1 − α)·S(writers)."""
        rule = op.select.rule
        if rule == "top_n":
            chosen = ranked[: op.select.n]
        elif rule == "threshold":
            chosen = [lh for lh in ranked if share[lh] >= op.select.threshold]
            if not chosen:
                raise InvalidInput(f"operations[{i}].select.threshold", f"no head writes a share >= "
                                   f"{op.select.threshold:g} of {op.concepts}'s direction (the best writes "
                                   f"{share[ranked[0]]:.3f} if any); nothing was changed")
        elif rule == "explicit":
            chosen = list(dict.fromkeys((layer, head) for layer, head, _ in op.select.vectors))
            for j, (layer, head) in enumerate(chosen):
                if (layer, head) not in share or layer not in self.layers_per_op[i]:
                    raise InvalidInput(f"operations[{i}].select.vectors[{j}]", f"layer {layer} head {head} is not "
                                       "a head of this operation's layers")
        else:
            chosen = None
        if not ranked and chosen is None:
            raise InvalidInput(f"operations[{i}]", f"no head of layers {self.layers_per_op[i]} writes along "
                               f"{op.concepts}; nothing would change")
        if chosen is not None and op.target is None:  # expert override: fixed writers and α
            return chosen, self._strength(op)
        target = float(op.target) if aimed is None else aimed
        if chosen is not None or op.strength is None:
            writers = chosen if chosen is not None else ranked
            covered = sum(share[lh] for lh in writers)
            alpha = solve_uniform_alpha(covered, target)
            best = 1.0 - (1.0 - _limit(op.action)) * covered
            if not _in_range(op.action, alpha):
                alpha = _limit(op.action)
                self._unreachable(i, op, best, f"its writers cover {covered:.2f} of the concept's write capacity",
                                  target)
            return writers, alpha
        alpha = float(op.strength)  # auto writers, fixed α: add heads until the target is met
        chosen, covered = [], 0.0
        for lh in ranked:
            chosen.append(lh)
            covered += share[lh]
            if _meets(op.action, 1.0 - (1.0 - alpha) * covered, target):
                return chosen, alpha
        self._unreachable(i, op, 1.0 - (1.0 - alpha) * covered, f"all heads at α = {alpha:g}")
        return chosen, alpha

    def _head_ablation(self, i: int, op: Operation, preserve: list[str]) -> None:
        if op.action not in SUPPRESSING:
            raise InvalidInput(f"operations[{i}].operator", "head_ablation only suppresses (it zeroes whole heads)")
        heads = self._heads(i)
        gs = [self.geometry.residual_direction(c) for c in op.concepts]
        shares = [self.geometry.head_share(g) for g in gs]
        kept = [self.geometry.head_share(self.geometry.residual_direction(c)) for c in preserve]
        score = {lh: sum(s[lh] for s in shares) / len(shares) - (max(k[lh] for k in kept) if kept else 0.0)
                 for lh in heads}
        ranked = sorted(heads, key=lambda lh: (-score[lh], lh))
        rule = op.select.rule
        if rule == "top_n":
            chosen = ranked[: op.select.n]
        elif rule == "threshold":
            chosen = [lh for lh in ranked if score[lh] >= op.select.threshold]
        elif rule == "explicit":
            chosen = list(dict.fromkeys((layer, head) for layer, head, _ in op.select.vectors))
        else:
            chosen = []
            target = float(op.target)
            for lh in ranked:
                chosen.append(lh)
                presence = self._presence_with_heads(op.concepts, chosen)
                if max(presence.values()) <= target + 1e-9:
                    break
            else:
                self._unreachable(i, op, max(self._presence_with_heads(op.concepts, chosen).values()),
                                  "every head of the layers ablated")
        if not chosen:
            raise InvalidInput(f"operations[{i}].select", f"no head selected for {op.concepts}")
        rank = self.decomposition[chosen[0][0]].S.shape[1]
        for layer, head in chosen:
            for j in range(rank):
                self._claim(i, (layer, head, j), 0.0, score[(layer, head)], "head_ablation", [])

    def _presence_with_heads(self, concepts, heads) -> dict[str, float]:
        values = {layer: alpha.clone() for layer, alpha in self.values.items()}
        for layer, head in heads:
            values[layer][head] = 0.0
        return self.presence(concepts, values)

    def _output_projection(self, i: int, op: Operation, preserve: list[str]) -> None:
        if op.select.rule != "auto":
            raise InvalidInput(f"operations[{i}].select", "output_projection edits one writer (visual.proj); "
                               "it takes the auto rule only")
        alpha = float(op.target) if op.target is not None else self._strength(op)
        if op.action in SUPPRESSING:
            self.warnings.append(f"[uncalibrated] operations[{i}]: output_projection's predicted presence is the share "
                                 f"of the text direction of {', '.join(op.concepts)} left in the embedding, not a "
                                 "prediction of recognition: on the testbed, predicted presence 0.1 removed a shape "
                                 "but left colours recognised (recall above 85 %; docs/edits.md, Frontier); check "
                                 "the effect on data")
        for concept in op.concepts:
            u = self.geometry.joint_direction(concept)
            pair = self._pair(u, self._keep_directions(op, concept, preserve, joint_space=True),
                              self._other_directions(i, preserve, joint_space=True))
            self.maps.append(WriteMap("output", -1, -1, pair, alpha))
            self.affected[("o", len(self.maps))] = AffectedVector(-1, -1, -1, 1.0, alpha, 1.0, i, [(concept, 1.0)],
                                                                  "output_projection")

    def _sith_scale(self, i: int, op: Operation, preserve: list[str]) -> None:
        vectors = self.vectors
        if vectors is None:
            raise InvalidInput("vectors", "sith_scale needs the analysed singular vectors")
        layer_of = torch.tensor([k[0] for k in vectors.keys])
        allowed = torch.isin(layer_of, torch.tensor(self.layers_per_op[i]))
        explanation = vectors.explanations
        if op.select.rule != "auto" or op.target is None:
            relevance = self.judge.score(vectors, op.concepts)
            if relevance.shape != (len(vectors),) or not torch.isfinite(relevance).all():
                raise InvalidInput("judge", f"{self.judge.name} returned invalid scores for operations[{i}]")
            selection = op.select if op.select.rule != "auto" else top_n()
            chosen = select(selection, vectors, relevance, allowed, f"operations[{i}]", op.concepts)
            if op.target is None:
                for pos in chosen:
                    self._claim(i, vectors.keys[pos], self._strength(op), float(relevance[pos]), "sith_scale",
                                explanation[pos])
                return
            contribution = self._contributions(op.concepts)
            covered = float(sum(contribution[pos] for pos in chosen))
            alpha = solve_uniform_alpha(covered, float(op.target))
            if not _in_range(op.action, alpha):
                alpha = _limit(op.action)
                self._unreachable(i, op, 1.0 - (1.0 - alpha) * covered,
                                  f"the selected vectors carry {covered:.2f} of the concept's write capacity")
            for pos in chosen:
                self._claim(i, vectors.keys[pos], alpha, float(relevance[pos]), "sith_scale", explanation[pos])
            return
        # auto: vectors by what they write along the concept minus what they write along preserved ones
        contribution = self._contributions(op.concepts)
        cost = self._contributions(preserve, reduce="max") if preserve else torch.zeros_like(contribution)
        score = torch.where(allowed, contribution - cost, torch.full_like(contribution, -float("inf")))
        order = [p for p in torch.argsort(-score, stable=True).tolist() if bool(allowed[p]) and contribution[p] > 0]
        alpha = self._strength(op)
        target = float(op.target)
        covered = 0.0
        for pos in order:
            self._claim(i, vectors.keys[pos], alpha, float(score[pos]), "sith_scale", explanation[pos])
            covered += float(contribution[pos])
            if _meets(op.action, 1.0 - (1.0 - alpha) * covered, target):
                return
        self._unreachable(i, op, 1.0 - (1.0 - alpha) * covered, "every vector of the layers selected")

    def _contributions(self, concepts: Sequence[str], reduce: str = "mean") -> Tensor:
        """Per candidate vector: its share of each concept's write capacity, (σ_j v_jᵀĝ)² / Σ (whole tower)."""
        rows = []
        for concept in concepts:
            g = self.geometry.residual_direction(concept)
            coords = self.geometry.head_coords(g)
            total = (sum(float((c**2).sum()) for c in coords.values())
                     + sum(float((c**2).sum()) for c in self.geometry.mlp_coords(g).values())) or 1.0
            rows.append(torch.tensor([float(coords[layer][h, j] ** 2) / total if layer in coords else 0.0
                                      for layer, h, j in self.vectors.keys], dtype=torch.float64))
        stacked = torch.stack(rows)
        return stacked.max(dim=0).values if reduce == "max" else stacked.mean(dim=0)


def _limit(action: str) -> float:
    """The furthest α an operator may go for an action (suppress: remove; flip/amplify: the bound)."""
    return {"suppress": 0.0, "flip": -MAX_ABS_STRENGTH, "amplify": MAX_ABS_STRENGTH}.get(range_action(action), 1.0)


def _in_range(action: str, alpha: float) -> bool:
    if action in SUPPRESSING:
        return 0.0 <= alpha < 1.0
    if action == "amplify":
        return 1.0 < alpha <= MAX_ABS_STRENGTH
    if action == "flip":
        return -MAX_ABS_STRENGTH <= alpha < 0.0
    return True


def plan_from_vectors(spec: EditSpec, model_name: str, model_hash: str, decomposition: dict[int, LayerSVD],
                      vectors: VectorSet | None, layers_per_op: list[list[int]], joint, dictionary,
                      judge: Judge | None = None, *, tower: dict[int, LayerSVD] | None = None,
                      preserve_weight: float = DEFAULT_PRESERVE_WEIGHT,
                      preserve_others_weight: float = DEFAULT_PRESERVE_OTHERS_WEIGHT, model=None,
                      anchor_weight: float = ANCHOR_WEIGHT) -> EditPlan:
    """Plan every operation, resolve conflicts, build the edit and the preview.

    ``tower`` is the decomposition of every layer (predicted presence sums over the whole tower);
    it defaults to ``decomposition``. ``model`` (the CLIP or LoadedModel) adds the MLP writers and
    the prior (operators.tower_writers) to the geometry; without it only heads are known and
    head_mlp_project and head_mlp_orthogonal are refused. ``preserve_weight`` (λ) weighs the
    preserved concepts, ``preserve_others_weight`` (λ_o) every other concept (``other_concepts``) in
    the projections' closed form (operators.preserving_pair); both must be finite and >= 0.
    ``anchor_weight`` (κ, in [0, 1]) is the share an anchored map re-writes along its anchor."""
    spec.validate()
    preserve_weight = _weight("preserve_weight", preserve_weight)
    preserve_others_weight = _weight("preserve_others_weight", preserve_others_weight)
    anchor_weight = _weight("anchor_weight", anchor_weight)
    if anchor_weight > 1.0:
        raise InvalidInput("anchor_weight", f"must be <= 1 (re-write at most what is removed), got {anchor_weight:g}")
    judge = judge or DictionaryJudge(dictionary)
    # The plan is small float64 algebra on the CPU whatever device the SVD ran on (a GPU analyzer's
    # decomposition would otherwise meet CPU directions); apply_multipliers moves it back to the model.
    decomposition = {layer: svd.to("cpu") for layer, svd in decomposition.items()}
    tower = None if tower is None else {layer: svd.to("cpu") for layer, svd in tower.items()}
    mlp, prior = tower_writers(model) if model is not None else (None, None)
    geometry = Geometry(joint, dictionary, tower or decomposition, mlp, prior)
    planner = _Planner(spec, decomposition, vectors, layers_per_op, joint, dictionary, judge, geometry,
                       preserve_weight, preserve_others_weight, anchor_weight)
    preserved: list[list[str]] = []
    for i, op in enumerate(spec.operations):
        if isinstance(judge, DictionaryJudge) or op.operator != "sith_scale":
            preserved.append(preserved_concepts(spec, i, dictionary))
        else:
            preserved.append([])
        planner.plan(i, op, preserved[i])
    multipliers = planner.multipliers(model_hash)
    affected = sorted(planner.affected.values(), key=lambda a: (a.operation, a.layer, a.head, a.index))
    predicted, warnings = _predicted(spec, geometry, multipliers, preserved, dictionary, planner.warnings,
                                     planner.aimed, planner.multipliers(model_hash, anchored=False))
    heads = _head_changes(decomposition, multipliers, affected)
    alignment = _alignment(spec, decomposition, multipliers, heads, joint, dictionary)
    return EditPlan(spec, model_name, model_hash, judge.name, multipliers, affected, heads, alignment,
                    decomposition, planner.notes, predicted, planner.warnings + warnings)


def _predicted(spec, geometry, multipliers, preserved, dictionary, planned: list[str],
               aimed: dict | None = None, unanchored: Multipliers | None = None
               ) -> tuple[list[ConceptEffect], list[str]]:
    """The preview's predicted presences, and the warnings the planner has not already given.
    ``unanchored``: the edit without its anchors' re-write, on which the edited concepts are measured
    (preserved concepts, an anchor among them, are measured on the edit as written)."""
    known = set(dictionary.concepts)
    targets = list(dict.fromkeys(c for op in spec.operations for c in op.concepts if c in known))
    keep = list(dict.fromkeys(c for p in preserved for c in p if c not in targets))
    after = predicted_presence(geometry, multipliers if unanchored is None else unanchored, targets)
    after.update(predicted_presence(geometry, multipliers, keep))
    effects = [ConceptEffect(c, "target", 1.0, after[c]) for c in targets]
    effects += [ConceptEffect(c, "preserve", 1.0, after[c]) for c in keep]
    warnings = [f"[preserve] preserved concept {e.concept!r} is predicted to change: presence {e.after:.3f} "
                "(1 = untouched)" for e in effects if e.role == "preserve" and abs(e.after - 1.0) > PRESERVE_WARNING]
    for i, op in enumerate(spec.operations):
        if op.target is not None:
            for c in op.concepts:
                goal = (aimed or {}).get((i, c), op.target)
                if c in after and not _meets(op.action, after[c], goal) and not any(
                        f"operations[{i}]" in w for w in planned + warnings):
                    warnings.append(f"[unreachable] operations[{i}]: {c!r} is predicted at presence "
                                    f"{after[c]:.3f}, short of the target {goal:g}")
    return effects, warnings


def _edited_write(decomposition, multipliers: Multipliers, layer: int, head: int) -> Tensor:
    """diag(α σ) Vᵀ T of one head [r, d] (its write map up to the orthonormal U)."""
    svd = decomposition[layer]
    s, v = svd.S[head].double().cpu(), svd.V[head].double().cpu()
    rows = (multipliers.values[layer][head].double() * s)[:, None] * v.T
    return multipliers.map_rows(rows, "head", layer, head)


def _head_changes(decomposition, multipliers: Multipliers, affected: list[AffectedVector]) -> list[HeadChange]:
    counts: dict[tuple[int, int], int] = {}
    for a in affected:
        if a.layer >= 0 and a.head >= 0:
            counts[(a.layer, a.head)] = counts.get((a.layer, a.head), 0) + 1
    out = []
    for (layer, head), n in sorted(counts.items()):
        s = decomposition[layer].S[head].double().cpu()
        after = _edited_write(decomposition, multipliers, layer, head)
        out.append(HeadChange(layer, head, n, float((s**2).sum()), float((after**2).sum())))
    return out


def _alignment(spec, decomposition, multipliers, heads: list[HeadChange], joint, dictionary) -> list[ConceptAlignment]:
    out = []
    known = set(dictionary.concepts)
    for i, op in enumerate(spec.operations):
        concepts = [c for c in op.concepts if c in known]  # an external judge may take free text
        if not concepts:
            continue
        directions = _concept_directions(joint, dictionary, concepts)  # [C, d]
        for change in heads:
            svd = decomposition[change.layer]
            v = svd.V[change.head].double().cpu()  # [d, r]
            s = svd.S[change.head].double().cpu()
            before = ((directions @ v) * s).norm(dim=-1)
            after = (directions @ _edited_write(decomposition, multipliers, change.layer, change.head).T).norm(dim=-1)
            for c, concept in enumerate(concepts):
                out.append(ConceptAlignment(concept, i, change.layer, change.head, float(before[c]), float(after[c])))
    return out


def plan_edit(analyzer, spec: EditSpec, judge: Judge | None = None, *, method: str = "comp",
              k: int = EXPLANATION_K, coherence: float | None = None,
              preserve_weight: float = DEFAULT_PRESERVE_WEIGHT,
              preserve_others_weight: float = DEFAULT_PRESERVE_OTHERS_WEIGHT,
              anchor_weight: float = ANCHOR_WEIGHT) -> EditPlan:
    """Plan ``spec`` on the analyzer's model: decomposition, COMP codes (for sith_scale),
    selection, preview.

    Uses the analyzer's memoised (and cached) SVDs, joint-space targets and codes, so a preview
    after an `explain` costs only the ranking. The SVD of every layer is needed for the predicted
    presence (a few small per-head SVDs); COMP codes only for the layers of sith_scale operations.
    """
    spec.validate()
    _weight("preserve_weight", preserve_weight)
    _weight("preserve_others_weight", preserve_others_weight)
    loaded = analyzer.loaded
    layers_per_op = operation_layers(loaded.info, spec)
    layers = sorted({layer for layers in layers_per_op for layer in layers})
    decomposition = analyzer.decomposition(layers)
    tower = analyzer.decomposition(list(range(loaded.info.layers)))
    coded = sorted({layer for op, ls in zip(spec.operations, layers_per_op) if op.operator == "sith_scale"
                    for layer in ls})
    vectors = None
    if coded:
        extra = {} if coherence is None else {"coherence": coherence}
        sub = {layer: decomposition[layer] for layer in coded}
        codes = {layer: analyzer.codes(layer, method, k, **extra) for layer in coded}
        targets = {layer: analyzer.targets(layer) for layer in coded}
        vectors = vector_set(sub, targets, codes, analyzer.dictionary)
    return plan_from_vectors(spec, loaded.name, loaded.hash, decomposition, vectors, layers_per_op,
                             analyzer.joint, analyzer.dictionary, judge, tower=tower,
                             preserve_weight=preserve_weight, preserve_others_weight=preserve_others_weight,
                             anchor_weight=anchor_weight,
                             model=loaded.model)
