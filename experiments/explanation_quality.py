"""Experiment (d): do explanations recover the synthetic world's ground-truth factors?

Every concept of the testbed dictionary either names a value of one factor (shape, colour,
background, texture, size, position, count, group) or is a distractor. For each sparse coder
(COMP, NNOMP, top-k, specific; K = 5) over the analysed layers (the per-vector agreement with
data-driven ground truth is measured by ``experiments/ground_truth.py``):

* theme share: share of heads whose theme (Analyzer's σ-weighted concept scores, top 5) puts
  ≥ 60% of its score mass on one factor;
* purity: for each head's 5 strongest vectors, the share of its concepts that belong to the
  vector's most common factor (distractors count against it), averaged;
* fidelity: mean spec §1.8 fidelity over every analysed vector (the authors' metric, in the
  residual stream: the code is mapped back through pinv(proj));
* joint fidelity: mean cosine between the code's reconstruction and its target in the joint space,
  where the coders work. The two differ by the conditioning of ``proj``: pinv amplifies the error
  along proj's weak directions (``proj_condition`` = σ_max/σ_min of proj is reported with them).
"""

from __future__ import annotations

from collections import Counter

import torch

import torch.nn.functional as F

from sith.engine.sparse import fidelity, reconstruct
from sith.testbed.vocabulary import testbed_categories

THEME_SHARE = 0.6
METHODS = ("comp", "nnomp", "topk", "specific")


def factor_words() -> dict[str, str]:
    """Concept string -> factor name."""
    return {word: factor for factor, words in testbed_categories().items() for word in words}


def _vector_purity(concepts: list[tuple[str, float]], table: dict[str, str]) -> float:
    if not concepts:
        return 0.0
    factors = Counter(table.get(c, "-") for c, _ in concepts)
    factors.pop("-", None)
    return max(factors.values(), default=0) / len(concepts)


def _theme_is_one_factor(theme: list[tuple[str, float]], table: dict[str, str]) -> bool:
    total = sum(score for _, score in theme)
    if total <= 0:
        return False
    mass: Counter = Counter()
    for concept, score in theme:
        if concept in table:
            mass[table[concept]] += score
    return bool(mass) and max(mass.values()) / total >= THEME_SHARE


def evaluate(analyzer, layers: list[int], k: int = 5) -> dict[str, dict[str, float]]:
    table = factor_words()
    results = {}
    for method in METHODS:
        summaries = analyzer.explain(layers=layers, method=method, k=k, vectors=5, theme_size=5)
        theme = sum(_theme_is_one_factor(s.theme, table) for s in summaries) / len(summaries)
        purity = [_vector_purity(v.concepts, table) for s in summaries for v in s.vectors]
        fid, joint = [], []
        for layer in layers:
            svd = analyzer.decomposition([layer])[layer]
            raw = svd.V.transpose(1, 2).reshape(-1, svd.V.shape[1])
            codes = analyzer.codes(layer, method, k)
            fid.append(fidelity(codes, analyzer.atoms, analyzer.joint, raw))
            joint.append(F.cosine_similarity(reconstruct(codes, analyzer.atoms), analyzer.targets(layer), dim=1))
        results[method] = {"theme_one_factor": theme, "purity": sum(purity) / len(purity),
                           "fidelity": float(torch.cat(fid).mean()), "joint_fidelity": float(torch.cat(joint).mean())}
    singular = torch.linalg.svdvals(analyzer.loaded.model.visual.proj.detach().double())
    results["proj_condition"] = float(singular[0] / singular[-1])
    return results
