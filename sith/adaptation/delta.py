"""Fine-tuning deltas per head: the SVD of ΔW_VO = W_VO^ft − W_VO^base, explained with COMP (spec §5).

Each model is folded with its *own* ln_1 (``vo_factors``), so ΔW is the change of the map a head
actually applies. ΔW = A_ft B_ft − A_base B_base has rank ≤ 2·dh, so its SVD comes from the
stacked factors [A_ft, −A_base] and [B_ft; B_base] through the engine's thin-QR ``factor_svd``:
never a dense d×d matrix.

The delta's right singular vectors are write directions like any other, mapped into the joint
space of the *fine-tuned* model (its ln_post, proj and data-free image mean) and coded over a
dictionary embedded by the fine-tuned text tower: they describe what the new model writes. The
sign of a singular pair is arbitrary (the engine fixes it by u's largest entry) and COMP is
non-negative, so each delta direction is explained at both poles (+v and −v).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sith.engine.analysis import Analyzer
from sith.engine.decomposition import LayerSVD, factor_svd, resolve_layers, vo_factors
from sith.engine.errors import InvalidInput
from sith.engine.towers import adapter_for
from sith.engine.sparse import DEFAULT_COHERENCE, DEFAULT_K, SparseCodes, encode

# A head counts as changed when ‖ΔW‖_F / ‖W_base‖_F exceeds this (float32 noise is ~1e-7).
CHANGED_TOLERANCE = 1e-5


def check_compatible(base, finetuned) -> None:
    """Both models must share the vision architecture (InvalidInput on field "finetuned")."""
    if base.info != finetuned.info:
        raise InvalidInput("finetuned", f"architecture differs from the base model: {finetuned.info} vs {base.info}")


def delta_layer(base_block, ft_block, num_heads: int, layer: int) -> LayerSVD:
    """SVD of every head's ΔW_VO (rank ≤ 2·dh) from the stacked factors."""
    a_base, b_base = vo_factors(base_block, num_heads)
    a_ft, b_ft = vo_factors(ft_block, num_heads)
    a = torch.cat([a_ft, -a_base], dim=2)  # [H, d, 2dh]
    b = torch.cat([b_ft, b_base], dim=1)  # [H, 2dh, d]
    u, s, v = factor_svd(a, b)
    return LayerSVD(layer=layer, U=u, S=s, V=v)


def delta_decomposition(base, finetuned, layers: int | Sequence[int] | None = None) -> dict[int, LayerSVD]:
    """ΔW SVD per layer (default the last four) for two LoadedModels of one architecture."""
    check_compatible(base, finetuned)
    blocks_b = adapter_for(base.model).blocks
    blocks_f = adapter_for(finetuned.model).blocks
    heads = base.info.heads
    with torch.no_grad():
        return {layer: delta_layer(blocks_b[layer], blocks_f[layer], heads, layer)
                for layer in resolve_layers(base.info, layers)}


@dataclass
class DeltaDirection:
    index: int
    sigma: float
    positive: list[tuple[str, float]]  # COMP explanation of +v
    negative: list[tuple[str, float]]  # COMP explanation of −v


@dataclass
class HeadDelta:
    layer: int
    head: int
    norm: float  # ‖ΔW‖_F
    relative: float  # ‖ΔW‖_F / ‖W_base‖_F
    effective_rank: float  # exp(entropy of σ²/Σσ²): how many directions carry the change
    directions: list[DeltaDirection] = field(default_factory=list)


def effective_rank(sigma: Tensor) -> float:
    energy = sigma.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 0.0
    p = energy / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _concepts(names: list[str], codes: SparseCodes, row: int) -> list[tuple[str, float]]:
    return [(names[i], round(c, 6)) for i, c in zip(codes.indices[row].tolist(), codes.coefficients[row].tolist())
            if c > 0]


def explain_delta(
    delta: dict[int, LayerSVD],
    base_norms: dict[int, Tensor],
    analyzer: Analyzer,
    directions: int = 3,
    method: str = "comp",
    k: int = DEFAULT_K,
    coherence: float = DEFAULT_COHERENCE,
) -> list[HeadDelta]:
    """Per head: the size of the change and its ``directions`` strongest delta directions explained.

    ``analyzer`` belongs to the fine-tuned model (its joint space and dictionary atoms are used);
    ``base_norms[layer]`` is ‖W_base‖_F per head [H].
    """
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 0:
        raise InvalidInput("directions", f"must be a non-negative integer, got {directions!r}")
    names = analyzer.dictionary.concepts
    out = []
    for layer, svd in delta.items():
        heads, d, rank = svd.V.shape
        n = min(directions, rank)
        codes = None
        if n:
            v = svd.V[:, :, :n].transpose(1, 2).reshape(-1, d)  # [H·n, d], head-major
            device = next(analyzer.loaded.model.parameters()).device
            targets = analyzer.joint.map(torch.cat([v, -v]).to(device)).to(analyzer.device)
            codes = encode(method, targets, analyzer.atoms, k=k, coherence=coherence)
        for h in range(heads):
            sigma = svd.S[h]
            norm = float(sigma.double().norm())
            base = float(base_norms[layer][h])
            item = HeadDelta(layer=layer, head=h, norm=norm, relative=norm / base if base > 0 else float("inf"),
                             effective_rank=effective_rank(sigma))
            if codes is not None and item.relative > CHANGED_TOLERANCE:
                for j in range(n):
                    row = h * n + j
                    item.directions.append(DeltaDirection(
                        index=j, sigma=float(sigma[j]),
                        positive=_concepts(names, codes, row), negative=_concepts(names, codes, heads * n + row)))
            out.append(item)
    return out


def base_norms(base, layers: Sequence[int]) -> dict[int, Tensor]:
    """‖W_VO^h‖_F per head [H] of the base model (from its singular values)."""
    blocks = adapter_for(base.model).blocks
    out = {}
    with torch.no_grad():
        for layer in layers:
            a, b = vo_factors(blocks[layer], base.info.heads)
            _, s, _ = factor_svd(a, b)
            out[layer] = s.double().norm(dim=1)
    return out


@dataclass
class DeltaReport:
    base: dict
    finetuned: dict
    heads: list[HeadDelta]
    layers: list[dict]  # per-layer summary: mean/max relative change, most-changed head

    def top_heads(self, n: int = 5) -> list[HeadDelta]:
        return sorted(self.heads, key=lambda h: (-h.relative, h.layer, h.head))[:n]


def layer_summary(heads: list[HeadDelta]) -> list[dict]:
    """Mean and max relative change per layer, and the head that changed most."""
    out = []
    for layer in sorted({h.layer for h in heads}):
        items = [h for h in heads if h.layer == layer]
        top = max(items, key=lambda h: h.relative)
        out.append({"layer": layer, "mean_relative": sum(h.relative for h in items) / len(items),
                    "max_relative": top.relative, "top_head": top.head,
                    "delta_norm": float(torch.tensor([h.norm for h in items]).norm())})
    return out


def analyze_delta(
    base,
    finetuned,
    analyzer: Analyzer,
    layers: int | Sequence[int] | None = None,
    directions: int = 3,
    method: str = "comp",
    k: int = DEFAULT_K,
    coherence: float = DEFAULT_COHERENCE,
) -> DeltaReport:
    """Everything ``sith adapt delta`` shows: per-head change sizes, explained directions, per-layer summary."""
    if analyzer.loaded is not finetuned and analyzer.loaded.hash != finetuned.hash:
        raise InvalidInput("analyzer", "the analyzer must belong to the fine-tuned model")
    delta = delta_decomposition(base, finetuned, layers)
    heads = explain_delta(delta, base_norms(base, list(delta)), analyzer, directions, method, k, coherence)
    return DeltaReport(base={"name": base.name, "hash": base.hash},
                       finetuned={"name": finetuned.name, "hash": finetuned.hash},
                       heads=heads, layers=layer_summary(heads))


def concept_share(heads: list[HeadDelta], concepts: set[str] | frozenset[str]) -> float:
    """σ-weighted share of the explanations' coefficient mass (both poles) that falls on ``concepts``.

    The task-relevance check of spec §5 without an LLM: a delta "explained by the sub-task" puts
    more of its mass on the sub-task's words than the model's own singular vectors do.
    """
    hit = total = 0.0
    for head in heads:
        for d in head.directions:
            for name, coef in d.positive + d.negative:
                total += d.sigma * coef
                if name in concepts:
                    hit += d.sigma * coef
    return hit / total if total > 0 else 0.0


def concept_alignment(delta: dict[int, LayerSVD], heads: Sequence[tuple[int, int]], analyzer: Analyzer,
                      directions: int = 3) -> Tensor:
    """Per dictionary concept [N]: σ-weighted mean over the chosen heads' top delta directions of
    max(cos(+t, atom), cos(−t, atom)), t the direction's joint-space target.

    A COMP-free check of task relevance: COMP keeps K atoms per direction and may pass over a
    concept whose atom sits next to a stronger one; the cosine ranks every concept.
    """
    device = next(analyzer.loaded.model.parameters()).device
    total = torch.zeros(analyzer.atoms.shape[0], dtype=torch.float64)
    weight = 0.0
    for layer, head in heads:
        svd = delta[layer]
        n = min(directions, svd.S.shape[1])
        v = svd.V[head, :, :n].T
        targets = analyzer.joint.map(torch.cat([v, -v]).to(device)).to(analyzer.device)
        cos = (targets @ analyzer.atoms.T).double().cpu()
        best = torch.maximum(cos[:n], cos[n:])
        sigma = svd.S[head, :n].double()
        total += (sigma[:, None] * best).sum(0)
        weight += float(sigma.sum())
    return (total / weight).float() if weight > 0 else total.float()
