"""Edit operators by name, and the data-free geometry the planner uses to predict their effect.

Every operator produces the same object (``Multipliers``: α per singular vector plus rank-one
write maps), so all of them are written back in the stock open_clip layout, compose and revert
through the manifest the same way. docs/edits.md says when to use which.

* ``sith_scale`` (the paper, spec §4.1): σ_j ← α σ_j for chosen singular vectors.
* ``head_project`` (beyond the paper): a chosen head's write w becomes w T with
  T = I − (1 − α) ĝ vᵀ, vᵀĝ = 1. ĝ is the concept's **pulled-back direction**: the first-order
  effect of a residual write w on the image embedding's score along a joint-space direction r is
  w·g with g = C(γ_post ⊙ P r) (through ``visual.proj`` P, scaled by ln_post's γ, centred), so
  T multiplies exactly that component by α and leaves the rest of every singular vector intact.
  v = M⁻¹ĝ / (ĝᵀM⁻¹ĝ) with M = I + λ G Gᵀ (G = the preserved concepts' pulled-back directions) is
  the UCE-style minimum-change solution of "T ĝ = α ĝ while T g_p ≈ g_p": λ = 0 is the orthogonal
  projection, λ → ∞ an oblique one that leaves the preserved directions exactly alone.
* ``head_ablation`` (baseline, TextSpan-style): α = 0 on every singular vector of chosen heads.
* ``output_projection`` (baseline, Chuang et al. 2023): the same rank-one map in the joint space,
  applied once to the final projection (``visual.proj``; written through the tower adapter's
  ``set_projection``, so towers whose readout ends in no linear projection reject it); it cannot
  choose writers.

The predicted **presence** of a concept x after an edit (``predicted_presence``) is the signed
share of the tower's attention write capacity along ĝ_x that survives:
Σ_heads ⟨diag(σ)Vᵀĝ_x, diag(ασ)VᵀTĝ_x⟩ / Σ_heads ‖diag(σ)Vᵀĝ_x‖² over **every head of every layer**
(1 = unchanged, 0 = removed, 1.5 = amplified, < 0 = flipped), times r̂_xᵀ T_out r̂_x for an output
map. It is first order (LN_post divides by a data-dependent norm) and ignores the MLPs and the
embeddings; experiments/ measures how well it ranks real effects.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sith.edits.multipliers import Multipliers
from sith.engine.decomposition import LayerSVD
from sith.engine.errors import InvalidInput


@dataclass(frozen=True)
class OperatorInfo:
    name: str
    writers: str  # "vectors" | "heads" | "output"
    summary: str


OPERATORS: dict[str, OperatorInfo] = {
    info.name: info
    for info in (
        OperatorInfo("head_project", "heads", "remove (scale) the concept's pulled-back direction from what chosen "
                     "heads write, contrastive against preserved concepts (default)"),
        OperatorInfo("sith_scale", "vectors", "scale the singular values of chosen singular vectors (the paper)"),
        OperatorInfo("head_ablation", "heads", "zero whole heads (baseline)"),
        OperatorInfo("output_projection", "output", "project the concept's text direction out of visual.proj "
                     "(baseline)"),
    )
}
DEFAULT_OPERATOR = "head_project"
AUTO = "auto"


def resolve_operator(name: str | None, field: str = "operator") -> str:
    """The operator's canonical name ("auto"/None = the default); unknown names → suggestions."""
    if name is None or name == AUTO:
        return DEFAULT_OPERATOR
    if not isinstance(name, str) or name not in OPERATORS:
        suggestions = difflib.get_close_matches(str(name), list(OPERATORS), n=3, cutoff=0.3) or list(OPERATORS)
        raise InvalidInput(field, f"unknown operator {name!r}; use one of {[AUTO, *OPERATORS]}",
                           suggestions=suggestions)
    return name


# ------------------------------------------------------------------------------------------------
# Geometry


class Geometry:
    """Pulled-back concept directions and write capacities of one model (no images needed)."""

    def __init__(self, joint, dictionary, decomposition: dict[int, LayerSVD]) -> None:
        """``joint``: the model's JointSpace (its ln_post and proj)."""
        pullback = getattr(joint, "pullback", None)  # diag(γ_post) P, or the tower adapter's equivalent
        if pullback is None:
            raise InvalidInput("model", "this vision tower's readout has no linear part to pull concepts back "
                               "through (see docs/towers.md)")
        self.pullback = pullback.detach().double().cpu()  # [d, D]
        self.dictionary = dictionary
        self.decomposition = decomposition  # every layer: presence sums over the whole tower

    def joint_direction(self, concept: str) -> Tensor:
        """Unit centred text embedding r̂_c [D] (the space the dictionary codes live in)."""
        return F.normalize(self.dictionary.centred[self.dictionary.index(concept)].double().cpu(), dim=0)

    def pull_back(self, r: Tensor) -> Tensor:
        """Unit ĝ = C(γ_post ⊙ P r) [d]: the residual direction whose write moves the score along r."""
        g = self.pullback @ r.double()
        return F.normalize(g - g.mean(), dim=0)

    def residual_direction(self, concept: str) -> Tensor:
        return self.pull_back(self.joint_direction(concept))

    def head_coords(self, g: Tensor) -> dict[int, Tensor]:
        """{layer: [H, r]} = diag(σ) Vᵀ g per head (what each singular vector writes along g)."""
        return {layer: svd.S.double() * torch.einsum("hdr,d->hr", svd.V.double(), g) for layer, svd in
                self.decomposition.items()}

    def head_share(self, g: Tensor) -> dict[tuple[int, int], float]:
        """Each head's share of the tower's attention write capacity along g (sums to 1)."""
        coords = self.head_coords(g)
        total = sum(float((c**2).sum()) for c in coords.values()) or 1.0
        return {(layer, h): float((c[h] ** 2).sum()) / total for layer, c in coords.items() for h in range(c.shape[0])}


def preserving_pair(u: Tensor, keep: Tensor | None, lam: float) -> tuple[Tensor, Tensor]:
    """(u, v) with vᵀu = 1 and v = M⁻¹u / uᵀM⁻¹u, M = I + λ K Kᵀ (K = [n, k] preserved directions).

    Minimises ‖T − I‖_F subject to T u = α u with the preservation penalty λ Σ‖T k − k‖²
    (closed form, UCE-style); λ = 0 gives v = u (orthogonal projection)."""
    u = u.double()
    if keep is None or keep.numel() == 0 or lam <= 0:
        return u, u / float(u @ u)
    k = keep.double()
    m = torch.eye(u.numel(), dtype=torch.float64) + lam * k @ k.T
    w = torch.linalg.solve(m, u)
    return u, w / float(u @ w)


# ------------------------------------------------------------------------------------------------
# Predicted effect


def predicted_presence(geometry: Geometry, multipliers: Multipliers, concepts: Sequence[str]) -> dict[str, float]:
    """Signed share of each concept's write capacity the edit keeps (module docstring)."""
    out = {}
    t_out = multipliers.maps_for("output")
    for concept in concepts:
        r = geometry.joint_direction(concept)
        g = geometry.pull_back(r)
        num = den = 0.0
        for layer, svd in geometry.decomposition.items():
            s, v = svd.S.double(), svd.V.double()
            before = s * torch.einsum("hdr,d->hr", v, g)  # [H, r]
            alpha = multipliers.values.get(layer)
            alpha = torch.ones_like(s) if alpha is None else alpha.double()
            den += float((before**2).sum())
            for h in range(s.shape[0]):
                gh = multipliers.map_vector(g, "head", layer, h)
                after = alpha[h] * s[h] * (v[h].T @ gh)
                num += float(before[h] @ after)
        share = num / den if den > 0 else 1.0
        if t_out:
            share *= float(r @ multipliers.map_vector(r, "output"))
        out[concept] = share
    return out


# ------------------------------------------------------------------------------------------------
# Building an operator's edit


def solve_uniform_alpha(keep_share: float, target: float) -> float:
    """α such that presence = 1 − (1 − α)·S reaches ``target`` (head_project on writers covering a
    share S of the capacity, whose maps scale ĝ exactly): α = 1 − (1 − target)/S."""
    if keep_share <= 0:
        return 0.0
    return 1.0 - (1.0 - target) / keep_share
