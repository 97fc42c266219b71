"""One JSON-ready result per analysis, shared by the CLI (``--json``), the worker jobs and the docs.

Keeping the assembly here means ``sith adapt delta`` and the ``adapt_delta`` job return the same
document for the same inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sith.adaptation.delta import analyze_delta
from sith.adaptation.stability import layer_stability, stability
from sith.adaptation.universality import (
    DEFAULT_PROFILE,
    GroundTruth,
    align_ground_truth,
    aligned_eta2,
    category_shares,
    dominant_category,
    ground_truth_similarity,
    head_profiles,
    label_agreement,
    match_profiles,
    null_scores,
    permutation_p,
    specialisation,
)
from sith.engine.analysis import Analyzer
from sith.engine.decomposition import CONVENTION
from sith.engine.sparse import DEFAULT_COHERENCE, DEFAULT_K

Step = Callable[[float, str], None]


def _noop(_fraction: float, _message: str) -> None:
    return None


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def delta_report(base, finetuned, analyzer: Analyzer, layers: int | Sequence[int] | None = None,
                 directions: int = 3, top: int = 8, method: str = "comp", k: int = DEFAULT_K,
                 coherence: float = DEFAULT_COHERENCE, step: Step = _noop) -> dict[str, Any]:
    """Delta explanations (the ``top`` most-changed heads), stability per head and per layer."""
    step(0.05, "decomposing the fine-tuning delta")
    report = analyze_delta(base, finetuned, analyzer, layers, directions, method, k, coherence)
    step(0.6, "measuring basis stability")
    heads = stability(base, finetuned, sorted({h.layer for h in report.heads}))
    per_layer = {row["layer"]: row for row in layer_stability(heads)}
    layers_out = [{**row, **per_layer[row["layer"]]} for row in report.layers]
    by_head = {(s.layer, s.head): s for s in heads}
    head_rows = []
    for h in report.heads:
        s = by_head[(h.layer, h.head)]
        head_rows.append({"layer": h.layer, "head": h.head, "relative": h.relative, "norm": h.norm,
                          "effective_rank": h.effective_rank, "right_subspace_cos": s.mean_right_cos,
                          "left_subspace_cos": s.mean_left_cos, "weighted_matched_cos": s.weighted_matched_cos,
                          "diagonal_dominance": s.diagonal_dominance, "captured": s.captured,
                          "right_cos": s.right_cos_distribution(), "rotated": s.rotated(),
                          "sigma_ratio": s.sigma_ratio[:8]})
    return jsonable({
        "base": report.base, "finetuned": report.finetuned, "convention": CONVENTION,
        "joint_space": "finetuned", "method": method, "k": k, "coherence": coherence,
        "top_heads": report.top_heads(top), "heads": head_rows, "layers": layers_out,
    })


def match_report(analyzer_a: Analyzer, analyzer_b: Analyzer, layers_a=None, layers_b=None,
                 categories: Mapping[str, Sequence[str]] | None = None, method: str = "comp",
                 k: int = DEFAULT_K, coherence: float = DEFAULT_COHERENCE, permutations: int = 200,
                 step: Step = _noop, ground_truth: tuple[GroundTruth, GroundTruth] | None = None,
                 seed: int = 0, profile: str = DEFAULT_PROFILE) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON result, extras for plotting) of matching A's heads to B's over one shared vocabulary.

    ``profile`` (``universality.PROFILES``): "comp" (the paper's sparse-code histogram; ``method``,
    ``k``, ``coherence`` apply to it only), "capacity" or "relative-capacity" (data-free write
    capacities). The default, ``universality.DEFAULT_PROFILE`` (relative capacity, chosen on the
    same-family validation pair, docs/towers.md), is the same for the CLI, the worker job and the
    SDK. A relative-capacity profile moves when any head of its tower changes, so a model matched
    with its own fine-tune should pass "capacity" (per head, exact) or "comp".

    Besides the matches: the concept-usage-preserving null with its permutation p-value, with
    categories also the category-block null (the fairer one for capacity profiles, whose related
    concepts move together; ``universality`` module docstring), the old label-shuffle null for
    comparison, the mean over all head pairs, the full similarity matrix, and the agreement of
    matched pairs' labels (dominant concept category; ground-truth factor when ``ground_truth`` is
    given, overall and per label; layer when depths are equal) against a permutation of B's labels.
    """
    step(0.05, "profiling heads of model A")
    pa = head_profiles(analyzer_a, layers_a, method, k, coherence, profile=profile)
    step(0.5, "profiling heads of model B")
    pb = head_profiles(analyzer_b, layers_b, method, k, coherence, profile=profile)
    step(0.8, "matching and permutation tests")
    matches, sim = match_profiles(pa, pb, categories)
    observed = float(np.mean([m.score for m in matches]))
    null = null_scores(pa, pb, permutations, seed=seed, kind="usage")
    label_null = null_scores(pa, pb, permutations, seed=seed, kind="labels")
    std = float(null.std())
    row_a = {h: i for i, h in enumerate(pa.heads)}
    row_b = {h: i for i, h in enumerate(pb.heads)}
    pairs = [(row_a[m.a], row_b[m.b]) for m in matches]
    result = {
        "a": {"name": analyzer_a.loaded.name, "hash": analyzer_a.loaded.hash, "heads": len(pa.heads)},
        "b": {"name": analyzer_b.loaded.name, "hash": analyzer_b.loaded.hash, "heads": len(pb.heads)},
        "vocabulary_size": len(pa.concepts), "method": method, "k": k, "coherence": coherence, "profile": profile,
        "mean_score": observed, "null_mean_score": float(null.mean()), "null_std": std,
        "null": {"kind": "usage", "description": "each concept permuted across B's heads (concept usage kept)",
                 "permutations": permutations, "mean": float(null.mean()), "std": std,
                 "p_value": permutation_p(observed, null),
                 "z": (observed - float(null.mean())) / std if std > 0 else None},
        "label_shuffle_null": {"description": "B's concept labels shuffled (usage destroyed; too easy, comparison only)",
                               "mean": float(label_null.mean()), "std": float(label_null.std()),
                               "p_value": permutation_p(observed, label_null)},
        "all_pairs_mean": float(sim.mean()),
        "mutual": sum(m.mutual for m in matches),
        "matches": matches,
        "similarity": {"heads_a": pa.heads, "heads_b": pb.heads, "matrix": sim.numpy().round(4)},
    }
    agreement: dict[str, Any] = {}
    if categories:
        block_null = null_scores(pa, pb, permutations, seed=seed, kind="categories", categories=categories)
        block_std = float(block_null.std())
        result["category_null"] = {
            "kind": "categories", "permutations": permutations,
            "description": "each category's concepts permuted across B's heads as one block (usage and "
                           "within-category structure kept; the fairer chance for capacity profiles)",
            "mean": float(block_null.mean()), "std": block_std, "p_value": permutation_p(observed, block_null),
            "z": (observed - float(block_null.mean())) / block_std if block_std > 0 else None}
        names, sa = category_shares(pa, categories)
        _, sb = category_shares(pb, categories)
        spec_a, spec_b = specialisation(sa, names), specialisation(sb, names)
        shared = [m for m in matches if m.category_a and m.category_a == m.category_b]
        result["specialised"] = {
            "a": {c: spec_a.count(c) for c in names if spec_a.count(c)},
            "b": {c: spec_b.count(c) for c in names if spec_b.count(c)},
            "shared_matches": [{"category": m.category_a, "a": m.a, "b": m.b, "score": m.score, "mutual": m.mutual}
                               for m in shared],
        }
        agreement["dominant_category"] = label_agreement(pairs, dominant_category(sa, names),
                                                         dominant_category(sb, names), seed=seed)
    if ground_truth is not None:
        truth_a, truth_b = ground_truth
        for key, relative in (("ground_truth", False), ("ground_truth_relative", True)):
            la, lb = align_ground_truth(pa, truth_a, relative), align_ground_truth(pb, truth_b, relative)
            agreement[key] = label_agreement(pairs, la, lb, seed=seed)
            result.setdefault("ground_truth", {})[key] = {
                "a": {c: la.count(c) for c in sorted(set(la))}, "b": {c: lb.count(c) for c in sorted(set(lb))}}
        result["ground_truth"]["profile_similarity"] = ground_truth_similarity(
            pairs, aligned_eta2(pa, truth_a), aligned_eta2(pb, truth_b), seed=seed)
        result["ground_truth"]["images"] = truth_a.images
        result["ground_truth"]["factors"] = truth_a.factors
        result["ground_truth"]["eta2_a"] = {f"L{l}H{h}": row for (l, h), row in zip(truth_a.heads, truth_a.eta2.numpy().round(4))}
        result["ground_truth"]["eta2_b"] = {f"L{l}H{h}": row for (l, h), row in zip(truth_b.heads, truth_b.eta2.numpy().round(4))}
        gt_a, gt_b = (align_ground_truth(pa, truth_a), align_ground_truth(pb, truth_b))
        for m, (i, j) in zip(matches, pairs):
            m.truth_a, m.truth_b = gt_a[i], gt_b[j]
    if analyzer_a.loaded.info.layers == analyzer_b.loaded.info.layers:
        agreement["same_layer"] = label_agreement(pairs, [str(h[0]) for h in pa.heads], [str(h[0]) for h in pb.heads],
                                                  seed=seed)
    result["agreement"] = agreement
    extras = {"profiles_a": pa, "profiles_b": pb, "similarity": sim.numpy(), "matches": matches}
    return jsonable(result), extras
