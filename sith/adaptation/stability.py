"""Does fine-tuning rotate a head's singular basis or only reweight it? (spec §5, "basis stability")

Per head, with base W = U_b diag(σ_b) V_bᵀ and fine-tuned W_ft = U_f diag(σ_f) V_fᵀ:

* principal angles between the base and fine-tuned right (write) and left (read) subspaces
  (cosines = singular values of V_bᵀ V_f);
* matched vectors: Hungarian matching of right vectors on |cos| (a reordering of σ must not count
  as rotation), the matched |cosines| and σ_f/σ_b of matched pairs;
* diagonal dominance ‖diag(M)‖²/‖M‖_F² of M = U_bᵀ W_ft V_b: 1 when the fine-tuned map is the
  base basis reweighted, lower when it mixes base directions; and ``captured`` = ‖M‖_F²/‖W_ft‖_F²,
  the share of the new map that still lives in the base subspaces (M alone cannot see the rest).

Every figure is reported plainly and σ_b-weighted (a tail direction with σ ≈ 0 is ill-defined and
may rotate freely without mattering).

A mean over principal angles hides single rotated directions (a subspace cosine of 0.99 over 32
angles allows one direction turned by 45°), so the distribution is reported too — minimum,
median and maximum cosine — and every principal direction or matched vector with cosine below
``ROTATED_COS`` is flagged as rotated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sith.adaptation.delta import check_compatible
from sith.engine.decomposition import LayerSVD, decompose_layer, resolve_layers, vo_factors
from sith.engine.towers import adapter_for

ROTATED_COS = 0.8  # a direction whose best counterpart has |cos| below this (≈ 37°) counts as rotated


@dataclass
class HeadStability:
    layer: int
    head: int
    right_angle_cos: list[float]  # principal-angle cosines, right subspaces, descending
    left_angle_cos: list[float]
    matching: list[int]  # base vector j -> fine-tuned vector matching[j]
    matched_cos: list[float]  # |cos(v_j^base, v_matching[j]^ft)|
    sigma_ratio: list[float]  # σ_ft[matching[j]] / σ_base[j]
    diagonal_dominance: float
    captured: float
    weighted_matched_cos: float  # σ_base-weighted mean of matched_cos

    @property
    def mean_right_cos(self) -> float:
        return float(np.mean(self.right_angle_cos))

    @property
    def mean_left_cos(self) -> float:
        return float(np.mean(self.left_angle_cos))

    @property
    def max_right_angle_deg(self) -> float:
        return float(np.degrees(np.arccos(np.clip(min(self.right_angle_cos), -1.0, 1.0))))

    def right_cos_distribution(self) -> dict[str, float]:
        """Minimum, median and maximum principal-angle cosine of the right subspaces."""
        values = np.asarray(self.right_angle_cos, dtype=float)
        return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}

    def rotated(self, threshold: float = ROTATED_COS) -> dict[str, list]:
        """Flagged directions: principal angles (index, degrees) and base vectors whose matched
        fine-tuned vector has |cos| < threshold (base index j, |cos|, σ_base share)."""
        angles = [(i, round(float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))), 1))
                  for i, c in enumerate(self.right_angle_cos) if c < threshold]
        vectors = [(j, round(float(c), 4)) for j, c in enumerate(self.matched_cos) if c < threshold]
        return {"principal": angles, "matched_vectors": vectors}


def _principal_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(x) and span(y) (orthonormal columns) [H, r]."""
    return torch.linalg.svdvals(x.transpose(1, 2) @ y).clamp(0.0, 1.0)


def head_stability(base: LayerSVD, ft: LayerSVD, w_ft_factors: tuple[torch.Tensor, torch.Tensor]) -> list[HeadStability]:
    """Stability figures for every head of one layer (see module docstring)."""
    a_ft, b_ft = (t.double() for t in w_ft_factors)
    ub, sb, vb = base.U.double(), base.S.double(), base.V.double()
    uf, sf, vf = ft.U.double(), ft.S.double(), ft.V.double()
    right = _principal_cosines(vb, vf)
    left = _principal_cosines(ub, uf)
    m = (ub.transpose(1, 2) @ a_ft) @ (b_ft @ vb)  # [H, r, r] = U_bᵀ W_ft V_b
    ft_energy = (sf ** 2).sum(dim=1)
    cos = (vb.transpose(1, 2) @ vf).abs()  # [H, r, r]
    out = []
    for h in range(ub.shape[0]):
        rows, cols = linear_sum_assignment(-cos[h].numpy())
        order = np.argsort(rows)
        match = cols[order]
        matched = cos[h].numpy()[np.arange(len(match)), match]
        sigma_b = sb[h].numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(sigma_b > 0, sf[h].numpy()[match] / sigma_b, np.nan)
        total = float((m[h] ** 2).sum())
        weights = sigma_b / sigma_b.sum() if sigma_b.sum() > 0 else np.full_like(sigma_b, 1 / len(sigma_b))
        out.append(HeadStability(
            layer=base.layer, head=h,
            right_angle_cos=right[h].tolist(), left_angle_cos=left[h].tolist(),
            matching=match.tolist(), matched_cos=matched.tolist(), sigma_ratio=ratio.tolist(),
            diagonal_dominance=float((torch.diagonal(m[h]) ** 2).sum()) / total if total > 0 else 1.0,
            captured=total / float(ft_energy[h]) if ft_energy[h] > 0 else 1.0,
            weighted_matched_cos=float((weights * matched).sum()),
        ))
    return out


def stability(base, finetuned, layers: int | Sequence[int] | None = None) -> list[HeadStability]:
    """Basis stability of every head in the chosen layers (default the last four)."""
    check_compatible(base, finetuned)
    blocks_b = adapter_for(base.model).blocks
    blocks_f = adapter_for(finetuned.model).blocks
    heads = base.info.heads
    out = []
    with torch.no_grad():
        for layer in resolve_layers(base.info, layers):
            svd_b = decompose_layer(blocks_b[layer], heads, layer)
            svd_f = decompose_layer(blocks_f[layer], heads, layer)
            out += head_stability(svd_b, svd_f, vo_factors(blocks_f[layer], heads))
    return out


def _mean(values: list[float]) -> float:
    return float(np.nanmean(values)) if values else float("nan")


def layer_stability(items: list[HeadStability], threshold: float = ROTATED_COS) -> list[dict]:
    """Per-layer means of the head figures (what the stability plot draws), plus the distribution of
    the layer's principal-angle cosines (all heads pooled) and the count of rotated directions."""
    out = []
    for layer in sorted({s.layer for s in items}):
        heads = [s for s in items if s.layer == layer]
        pooled = np.concatenate([s.right_angle_cos for s in heads])
        worst = min(heads, key=lambda s: min(s.right_angle_cos))
        out.append({
            "layer": layer,
            "right_cos_min": float(pooled.min()),
            "right_cos_median": float(np.median(pooled)),
            "right_cos_max": float(pooled.max()),
            "right_cos_min_head": worst.head,
            "rotated_principal": int((pooled < threshold).sum()),
            "rotated_matched": int(sum((np.asarray(s.matched_cos) < threshold).sum() for s in heads)),
            "directions": int(pooled.size),
            "right_subspace_cos": _mean([s.mean_right_cos for s in heads]),
            "left_subspace_cos": _mean([s.mean_left_cos for s in heads]),
            "matched_cos": _mean([float(np.mean(s.matched_cos)) for s in heads]),
            "weighted_matched_cos": _mean([s.weighted_matched_cos for s in heads]),
            "sigma_ratio_median": float(np.nanmedian(np.concatenate([s.sigma_ratio for s in heads]))),
            "diagonal_dominance": _mean([s.diagonal_dominance for s in heads]),
            "captured": _mean([s.captured for s in heads]),
        })
    return out
