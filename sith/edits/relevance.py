"""Relevance of every singular vector to named concepts, without an LLM, and the selection rules.

The default judge (``DictionaryJudge``) blends two data-free signals (docs/edits.md says why):

* **explanation** R_comp(j) = Σ_k c_k · max(0, max_γ cos(d̂_{i_k}, d̂_γ)) over vector j's COMP atoms
  (i_k, c_k) and the requested concepts γ. This is spec §4.4's rule, computed with the *centred*
  dictionary D̂ (the space the codes were fitted in): uncentred CLIP text embeddings share a large
  common component, so every atom looks ≈0.7 similar to every concept and the ranking is
  dominated by Σc_k instead of meaning. Negative similarities are clipped so an anti-related atom
  cannot cancel a matching one.
* **direct** R_dir(j) = max_γ |cos(t_j, d̂_γ)| between the vector's joint-space target t_j
  (spec §1.7) and the concept's centred embedding. It sees both poles of the axis (COMP explains
  only +v, while scaling σ acts on ±v) and does not depend on which K atoms COMP happened to pick.

relevance = w · R_comp + (1 − w) · R_dir with w = 0.5. Deterministic: ties are broken by
(layer, head, index). An external judge (an LLM, a human rating file) plugs in through ``Judge``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sith.engine.errors import InvalidInput

DEFAULT_BLEND = 0.5


@dataclass
class VectorSet:
    """The candidate singular vectors of one plan, flattened in (layer, head, index) order."""

    keys: list[tuple[int, int, int]]  # (layer, head, index)
    sigma: Tensor  # [B]
    targets: Tensor  # [B, D] unit joint-space targets t_j (spec §1.7)
    code_indices: Tensor  # [B, K] dictionary indices of the COMP atoms (-1 = padding)
    code_coefficients: Tensor  # [B, K] >= 0
    explanations: list[list[tuple[str, float]]]  # the same codes by name, for reports and judges

    def __len__(self) -> int:
        return len(self.keys)

    def position(self) -> dict[tuple[int, int, int], int]:
        return {key: i for i, key in enumerate(self.keys)}


class Judge(Protocol):
    """Scores vectors for concepts: higher = more relevant. Must be deterministic for a given input."""

    name: str

    def score(self, vectors: VectorSet, concepts: Sequence[str]) -> Tensor:  # [B]
        ...


class DictionaryJudge:
    """The default, LLM-free judge: COMP explanation relevance blended with direct similarity."""

    name = "dictionary-relevance-v1"

    def __init__(self, dictionary, blend: float = DEFAULT_BLEND) -> None:
        if not 0.0 <= blend <= 1.0:
            raise InvalidInput("blend", f"must be in [0, 1], got {blend}")
        self.dictionary = dictionary
        self.blend = blend

    def concept_rows(self, concepts: Sequence[str], field: str = "concepts") -> Tensor:
        """Centred embeddings [C, D] of the requested concepts; unknown names → closest entries."""
        rows = []
        for i, concept in enumerate(concepts):
            try:
                rows.append(self.dictionary.index(concept))
            except InvalidInput as exc:
                suggestions = exc.suggestions or self.dictionary.closest(concept, 5)
                raise InvalidInput(f"{field}[{i}]", f"unknown concept {concept!r}: not in the dictionary",
                                   suggestions=suggestions) from None
        return self.dictionary.centred[torch.tensor(rows)].float()

    def parts(self, vectors: VectorSet, concepts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(R_comp, R_dir), each [B]."""
        wanted = self.concept_rows(concepts)  # [C, D]
        atoms = self.dictionary.centred.float()
        idx = vectors.code_indices.clamp(min=0)
        sim = (atoms[idx] @ wanted.T).amax(dim=-1).clamp(min=0)  # [B, K]
        coef = torch.where(vectors.code_indices >= 0, vectors.code_coefficients.float(), 0.0)
        r_comp = (coef * sim).sum(dim=-1)
        r_dir = (vectors.targets.float() @ wanted.T).abs().amax(dim=-1)
        return r_comp, r_dir

    def score(self, vectors: VectorSet, concepts: Sequence[str]) -> Tensor:
        r_comp, r_dir = self.parts(vectors, concepts)
        return self.blend * r_comp + (1 - self.blend) * r_dir


def rank(relevance: Tensor, allowed: Tensor) -> list[int]:
    """Positions of allowed vectors by relevance, descending; ties keep (layer, head, index) order."""
    order = torch.argsort(-relevance.double(), stable=True).tolist()
    return [i for i in order if bool(allowed[i])]


def _describe(vectors: VectorSet, i: int, relevance: Tensor) -> str:
    layer, head, index = vectors.keys[i]
    return f"{float(relevance[i]):.3f} (layer {layer} head {head} vector {index})"


def select(selection, vectors: VectorSet, relevance: Tensor, allowed: Tensor, field: str,
           concepts: Sequence[str]) -> list[int]:
    """Apply a Selection; never returns an empty list (raises, naming the field, instead)."""
    ranked = rank(relevance, allowed)
    if not ranked:
        raise InvalidInput(f"{field}", "no singular vector is in the requested layers")
    if selection.rule == "explicit":
        where = vectors.position()
        chosen = []
        for i, key in enumerate(selection.vectors):
            if key not in where or not bool(allowed[where[key]]):
                raise InvalidInput(f"{field}.select.vectors[{i}]", f"(layer, head, index) {key} is not an "
                                   "analysed vector of this operation's layers")
            chosen.append(where[key])
        return chosen
    positive = [i for i in ranked if float(relevance[i]) > 0]
    if selection.rule == "top_n":
        if not positive:
            raise InvalidInput(f"{field}.select", f"no singular vector is relevant to {list(concepts)} "
                               "(all relevances are 0); nothing would change")
        return positive[: selection.n]
    chosen = [i for i in positive if float(relevance[i]) >= selection.threshold]
    if not chosen:
        raise InvalidInput(f"{field}.select.threshold", f"no singular vector reaches relevance "
                           f"{selection.threshold:g} for {list(concepts)}; the best is "
                           f"{_describe(vectors, ranked[0], relevance)}; nothing was changed. Lower the "
                           "threshold or use the top_n rule")
    return chosen
