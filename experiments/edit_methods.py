"""The edits compared in the experiments: SITH per-vector edits, whole-head ablation, §4.4 scaling.

* ``sith_suppress``: a spec (suppress the concepts, top-n selection) planned by ``plan_edit``.
* ``head_ablation``: the TextSpan-style baseline, made data-free: heads are ranked by the
  σ²-weighted mean relevance of their singular vectors to the concepts (the same relevance SITH
  uses, so the two differ only in granularity), and the chosen heads' whole W_VO is zeroed.
* ``paper_amplification``: spec §4.4 verbatim — task pool Γ from COMP (K = 10, λ = 0.3) of the
  class names over the uncentred dictionary Ē (class names themselves filtered out), relevance
  R_j = Σ_k c_k · max_γ ⟨ē_{i_k}, γ⟩, α_j = max(0.8, R_j + 0.3) on every analysed vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sith.edits.multipliers import Multipliers
from sith.edits.plan import EditPlan, plan_edit, vector_set
from sith.edits.relevance import DictionaryJudge
from sith.edits.spec import EditSpec, Operation, top_n
from sith.engine.dictionary import encode_texts
from sith.engine.sparse import comp


def sith_plan(analyzer, concepts: Sequence[str], n: int, action: str = "suppress", strength: float | None = None,
              layers: list[int] | None = None) -> EditPlan:
    spec = EditSpec(model=analyzer.loaded.name,
                    operations=[Operation(list(concepts), action, strength, layers, top_n(n),
                                          operator="sith_scale")]).validate()
    return plan_edit(analyzer, spec)


def _vectors(analyzer, layers: list[int]):
    decomposition = analyzer.decomposition(layers)
    codes = {layer: analyzer.codes(layer) for layer in layers}
    targets = {layer: analyzer.targets(layer) for layer in layers}
    return decomposition, vector_set(decomposition, targets, codes, analyzer.dictionary)


def head_scores(analyzer, concepts: Sequence[str], layers: list[int]) -> list[tuple[float, int, int]]:
    """(score, layer, head), best first: Σ_j σ_j² relevance_j / Σ_j σ_j² per head."""
    decomposition, vectors = _vectors(analyzer, layers)
    relevance = DictionaryJudge(analyzer.dictionary).score(vectors, concepts)
    weight = vectors.sigma.double() ** 2
    sums: dict[tuple[int, int], list[float]] = {}
    for (layer, head, _), r, w in zip(vectors.keys, relevance.tolist(), weight.tolist()):
        acc = sums.setdefault((layer, head), [0.0, 0.0])
        acc[0] += w * r
        acc[1] += w
    return sorted(((num / den, layer, head) for (layer, head), (num, den) in sums.items()), key=lambda t: (-t[0], t[1], t[2]))


def head_ablation(analyzer, concepts: Sequence[str], m: int, layers: list[int]) -> tuple[Multipliers, list]:
    decomposition = analyzer.decomposition(layers)
    chosen = head_scores(analyzer, concepts, layers)[:m]
    values = {layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()}
    for _, layer, head in chosen:
        values[layer][head] = 0.0
    return Multipliers(values, analyzer.loaded.hash), [(layer, head) for _, layer, head in chosen]


def paper_amplification(analyzer, class_names: Sequence[str], layers: list[int]) -> Multipliers:
    """Spec §4.4: α_j = max(0.8, R_j + 0.3) with the task pool and uncentred similarities."""
    dictionary = analyzer.dictionary
    uncentred = dictionary.embeddings.float()
    keep = torch.tensor([c not in set(class_names) for c in dictionary.concepts])
    pool_atoms = uncentred[keep]
    names = F.normalize(encode_texts(analyzer.loaded, list(class_names)).float(), dim=-1)
    codes = comp(names, pool_atoms, k=10, coherence=0.3)
    kept_rows = keep.nonzero().flatten()
    pool = sorted({int(kept_rows[i]) for i, c in zip(codes.indices.flatten().tolist(),
                                                      codes.coefficients.flatten().tolist()) if c > 0})
    gamma = uncentred[torch.tensor(pool)]  # [G, D]
    decomposition, vectors = _vectors(analyzer, layers)
    idx = vectors.code_indices.clamp(min=0)
    sim = (uncentred[idx] @ gamma.T).amax(dim=-1)  # [B, K]
    coef = torch.where(vectors.code_indices >= 0, vectors.code_coefficients, 0.0)
    relevance = (coef * sim).sum(dim=-1)
    alpha = torch.clamp(relevance + 0.3, min=0.8)
    values = {layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()}
    for (layer, head, j), a in zip(vectors.keys, alpha.tolist()):
        values[layer][head, j] = a
    return Multipliers(values, analyzer.loaded.hash)
