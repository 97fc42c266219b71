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
from sith.adaptation.universality import category_shares, head_profiles, match_profiles, null_scores, specialisation
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
                          "sigma_ratio": s.sigma_ratio[:8]})
    return jsonable({
        "base": report.base, "finetuned": report.finetuned, "convention": CONVENTION,
        "joint_space": "finetuned", "method": method, "k": k, "coherence": coherence,
        "top_heads": report.top_heads(top), "heads": head_rows, "layers": layers_out,
    })


def match_report(analyzer_a: Analyzer, analyzer_b: Analyzer, layers_a=None, layers_b=None,
                 categories: Mapping[str, Sequence[str]] | None = None, method: str = "comp",
                 k: int = DEFAULT_K, coherence: float = DEFAULT_COHERENCE, permutations: int = 20,
                 step: Step = _noop) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON result, extras for plotting) of matching A's heads to B's over one shared vocabulary."""
    step(0.05, "profiling heads of model A")
    pa = head_profiles(analyzer_a, layers_a, method, k, coherence)
    step(0.5, "profiling heads of model B")
    pb = head_profiles(analyzer_b, layers_b, method, k, coherence)
    step(0.9, "matching")
    matches, sim = match_profiles(pa, pb, categories)
    null = null_scores(pa, pb, permutations)
    scores = [m.score for m in matches]
    result = {
        "a": {"name": analyzer_a.loaded.name, "hash": analyzer_a.loaded.hash, "heads": len(pa.heads)},
        "b": {"name": analyzer_b.loaded.name, "hash": analyzer_b.loaded.hash, "heads": len(pb.heads)},
        "vocabulary_size": len(pa.concepts), "method": method, "k": k, "coherence": coherence,
        "mean_score": float(np.mean(scores)), "null_mean_score": float(null.mean()),
        "null_std": float(null.std()), "mutual": sum(m.mutual for m in matches),
        "matches": matches,
    }
    if categories:
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
    extras = {"profiles_a": pa, "profiles_b": pb, "similarity": sim.numpy(), "matches": matches}
    return jsonable(result), extras
