"""From an EditSpec to concrete multipliers, plus the dry-run preview of what they would change.

Planning never touches weights: it ranks the analysed singular vectors for each operation
(relevance.py), applies the selection rule, resolves conflicts between operations, and reports
per vector (explanation, relevance, α), per head (spectral energy Σσ² before/after) and per
concept (how strongly each edited head can still write along the concept's direction; data-free).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sith.edits.multipliers import Multipliers
from sith.edits.relevance import DictionaryJudge, Judge, VectorSet, select
from sith.edits.spec import EditSpec
from sith.engine.decomposition import LayerSVD, resolve_layers
from sith.engine.errors import InvalidInput

EXPLANATION_K = 5


@dataclass
class AffectedVector:
    layer: int
    head: int
    index: int
    sigma: float
    alpha: float
    relevance: float
    operation: int
    concepts: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "index": self.index, "sigma": self.sigma,
                "alpha": self.alpha, "relevance": self.relevance, "operation": self.operation,
                "concepts": [[c, w] for c, w in self.concepts]}


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "model": {"name": self.model_name, "hash": self.model_hash},
            "judge": self.judge,
            "affected": [a.to_dict() for a in self.affected],
            "heads": [h.to_dict() for h in self.heads],
            "concept_alignment": [c.to_dict() for c in self.concept_alignment],
            "notes": list(self.notes),
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
    out = []
    for i, op in enumerate(spec.operations):
        try:
            out.append(resolve_layers(info, op.layers))
        except InvalidInput as exc:
            raise InvalidInput(f"operations[{i}].layers", exc.reason) from None
    return out


# ------------------------------------------------------------------------------------------------
# Planning


def _concept_directions(joint, dictionary, concepts: Sequence[str]) -> Tensor:
    """Residual-width directions y_c [C, d] of the concepts (spec §1.8 inverse of the centred embedding)."""
    rows = torch.tensor([dictionary.index(c) for c in concepts])
    return joint.inverse(dictionary.centred[rows].float()).double().cpu()


def plan_from_vectors(spec: EditSpec, model_name: str, model_hash: str, decomposition: dict[int, LayerSVD],
                      vectors: VectorSet, layers_per_op: list[list[int]], joint, dictionary,
                      judge: Judge | None = None) -> EditPlan:
    """Select vectors for every operation, resolve conflicts, build multipliers and the preview."""
    spec.validate()
    judge = judge or DictionaryJudge(dictionary)
    layer_of = torch.tensor([k[0] for k in vectors.keys])
    owner: dict[int, int] = {}  # vector position -> operation index
    alpha_of: dict[int, float] = {}
    relevance_of: dict[int, float] = {}
    notes: list[str] = []
    for i, op in enumerate(spec.operations):
        field_name = f"operations[{i}]"
        if isinstance(judge, DictionaryJudge):
            judge.concept_rows(op.concepts, f"{field_name}.concepts")  # unknown names → suggestions
        relevance = judge.score(vectors, op.concepts)
        if relevance.shape != (len(vectors),) or not torch.isfinite(relevance).all():
            raise InvalidInput("judge", f"{judge.name} returned invalid scores for {field_name}")
        allowed = torch.isin(layer_of, torch.tensor(layers_per_op[i]))
        for pos in select(op.select, vectors, relevance, allowed, field_name, op.concepts):
            if pos in owner:
                prev = spec.operations[owner[pos]]
                layer, head, index = vectors.keys[pos]
                if spec.conflicts == "reject":
                    raise InvalidInput(field_name, f"conflict: layer {layer} head {head} vector {index} is selected "
                                       f"by operations[{owner[pos]}] ({prev.action} {prev.concepts}) and by "
                                       f"{field_name} ({op.action} {op.concepts}); narrow a selection or set "
                                       "conflicts='last_wins'")
                notes.append(f"layer {layer} head {head} vector {index}: {field_name} overrides "
                             f"operations[{owner[pos]}] (last_wins)")
            owner[pos] = i
            alpha_of[pos] = float(op.strength)
            relevance_of[pos] = float(relevance[pos])

    values = {layer: torch.ones_like(svd.S, dtype=torch.float32).cpu() for layer, svd in decomposition.items()}
    affected = []
    for pos in sorted(owner, key=lambda p: vectors.keys[p]):
        layer, head, index = vectors.keys[pos]
        values[layer][head, index] = alpha_of[pos]
        affected.append(AffectedVector(layer, head, index, float(vectors.sigma[pos]), alpha_of[pos],
                                       relevance_of[pos], owner[pos], vectors.explanations[pos]))
    multipliers = Multipliers(values, model_hash)
    heads = _head_changes(decomposition, multipliers, affected)
    alignment = _alignment(spec, decomposition, multipliers, heads, joint, dictionary)
    return EditPlan(spec, model_name, model_hash, judge.name, multipliers, affected, heads, alignment,
                    decomposition, notes)


def _head_changes(decomposition, multipliers: Multipliers, affected: list[AffectedVector]) -> list[HeadChange]:
    counts: dict[tuple[int, int], int] = {}
    for a in affected:
        counts[(a.layer, a.head)] = counts.get((a.layer, a.head), 0) + 1
    out = []
    for (layer, head), n in sorted(counts.items()):
        s = decomposition[layer].S[head].double().cpu()
        alpha = multipliers.values[layer][head].double()
        out.append(HeadChange(layer, head, n, float((s**2).sum()), float(((alpha * s) ** 2).sum())))
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
            alpha = multipliers.values[change.layer][change.head].double()
            coords = directions @ v  # [C, r]
            before = (coords * s).norm(dim=-1)
            after = (coords * s * alpha).norm(dim=-1)
            for c, concept in enumerate(concepts):
                out.append(ConceptAlignment(concept, i, change.layer, change.head, float(before[c]), float(after[c])))
    return out


def plan_edit(analyzer, spec: EditSpec, judge: Judge | None = None, *, method: str = "comp",
              k: int = EXPLANATION_K, coherence: float | None = None) -> EditPlan:
    """Plan ``spec`` on the analyzer's model: decomposition, COMP codes, selection, preview.

    Uses the analyzer's memoised (and cached) SVDs, joint-space targets and codes of every vector
    of the operations' layers, so a preview after an `explain` costs only the ranking.
    """
    spec.validate()
    loaded = analyzer.loaded
    layers_per_op = operation_layers(loaded.info, spec)
    layers = sorted({layer for layers in layers_per_op for layer in layers})
    decomposition = analyzer.decomposition(layers)
    extra = {} if coherence is None else {"coherence": coherence}
    codes = {layer: analyzer.codes(layer, method, k, **extra) for layer in layers}
    targets = {layer: analyzer.targets(layer) for layer in layers}
    vectors = vector_set(decomposition, targets, codes, analyzer.dictionary)
    return plan_from_vectors(spec, loaded.name, loaded.hash, decomposition, vectors, layers_per_op,
                             analyzer.joint, analyzer.dictionary, judge)
