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
  projection, λ → ∞ an oblique one that leaves the preserved directions exactly alone. An optional
  second, weaker term (λ_o / n_o) O Oᵀ protects every *other* concept (plan.other_concepts); off by
  default (docs/edits.md, "Frontier": it did not win on validation).
* ``head_mlp_project`` (beyond the paper; the default): the same map T on every chosen head AND on
  the output weights of every chosen block's MLP (W_mlp ← W_mlp T, row form; ``c_proj``/``fc2``
  through the tower adapter, bias untouched). The attention heads carry only part of a concept:
  on the testbed the MLPs hold 19–31 % of the write capacity along ĝ (data-free estimate below),
  and "blue" stays recognised at 66 % recall with every head projected, 14 % with the MLPs too.
* ``head_mlp_orthogonal`` (beyond the paper; **the default**): the same writers as
  head_mlp_project, with the symmetric map T = I − (1 − α) v̂ v̂ᵀ, v̂ = v/‖v‖ (v as above, λ =
  plan.ORTHOGONAL_PRESERVE_WEIGHT): it reads and removes along the direction made orthogonal-ish
  to the preserved concepts, so their writes are left alone and nothing is written towards them.
  It scales ĝ only by 1 − (1 − α)(v̂·ĝ)², so α is solved on the predicted presence (affine in α).
  Where even α = 0 cannot reach the aimed presence (a concept the tower leans to: most of its
  writes lie along the preserved directions), that concept gets head_mlp_project's form instead,
  and the plan notes it. Suppress with the planner's writers and α only; every other case
  (amplify, flip, a fixed strength or an explicit selection) uses head_mlp_project's form.
* ``head_ablation`` (baseline, TextSpan-style): α = 0 on every singular vector of chosen heads.
* ``output_projection`` (baseline, Chuang et al. 2023): the same rank-one map in the joint space,
  applied once to the final projection (``visual.proj``; written through the tower adapter's
  ``set_projection``, so towers whose readout ends in no linear projection reject it); it cannot
  choose writers.

The predicted **presence** of a concept x after an edit (``predicted_presence``) is the signed
share of the tower's write capacity along ĝ_x that survives, over **every head and every MLP of
every layer**: Σ ⟨c_w, c'_w⟩ / Σ ‖c_w‖² with c_w = diag(σ)Vᵀĝ_x for a head and ρ ⊙ W_mlp ĝ_x for an
MLP (ρ = the data-free RMS of each hidden unit: its pre-activation is N(b + w·β, ‖w ⊙ γ‖²) under a
unit-variance LayerNorm input, pushed through the block's own activation by Gauss–Hermite
quadrature; ``tower_writers``), c'_w the same after the edit (1 = unchanged, 0 = removed, 1.5 =
amplified, < 0 = flipped), times r̂_xᵀ T_out r̂_x for an output map. So heads alone can no longer
claim a concept the MLPs also write. It is first order (LN_post divides by a data-dependent
norm). The **prior** (``Geometry.prior_score``) is what it cannot see: the cosine between the
read-out token's image-independent start (open_clip: ln_pre(class_embedding + pos₀)) and the
concept's direction contrasted with its preserved neighbours. A concept with a positive prior is
where the tower lands when the evidence is gone, so removing its writes is not enough; the planner
aims such a concept lower (plan.PRIOR_WEIGHT) and warns when even presence 0 is not enough.
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
        OperatorInfo("head_mlp_orthogonal", "heads+mlps", "remove the concept's direction, made orthogonal to the "
                     "preserved concepts, from what every head and MLP writes; head_mlp_project's form where that "
                     "cannot reach the target (default)"),
        OperatorInfo("head_mlp_project", "heads+mlps", "remove (scale) the concept's pulled-back direction from "
                     "what every head AND every MLP writes, contrastive against preserved concepts"),
        OperatorInfo("head_project", "heads", "remove (scale) the concept's pulled-back direction from what chosen "
                     "heads write, contrastive against preserved concepts"),
        OperatorInfo("sith_scale", "vectors", "scale the singular values of chosen singular vectors (the paper)"),
        OperatorInfo("head_ablation", "heads", "zero whole heads (baseline)"),
        OperatorInfo("output_projection", "output", "project the concept's text direction out of visual.proj "
                     "(baseline)"),
    )
}
DEFAULT_OPERATOR = "head_mlp_orthogonal"
# Operators that write the same rank-one map into every head and MLP (head_project: heads only); their
# maps can also carry an anchor (plan.anchor_for).
PROJECTIONS = ("head_mlp_orthogonal", "head_mlp_project", "head_project")
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

    def __init__(self, joint, dictionary, decomposition: dict[int, LayerSVD],
                 mlp: dict[int, Tensor] | None = None, prior: Tensor | None = None) -> None:
        """``joint``: the model's JointSpace (its ln_post and proj). ``mlp``: {layer: [m, d]} each
        block's MLP write rows scaled by the data-free RMS of their hidden unit (``tower_writers``);
        ``prior``: the image-independent start of the read-out token [d] (or None)."""
        pullback = getattr(joint, "pullback", None)  # diag(γ_post) P, or the tower adapter's equivalent
        if pullback is None:
            raise InvalidInput("model", "this vision tower's readout has no linear part to pull concepts back "
                               "through (see docs/towers.md)")
        self.pullback = pullback.detach().double().cpu()  # [d, D]
        self.dictionary = dictionary
        # every layer (presence sums over the whole tower), on the CPU like the rest of the geometry:
        # the planner's algebra is small float64 work, whatever device the SVD ran on
        self.decomposition = {layer: svd.to("cpu") for layer, svd in decomposition.items()}
        self.mlp = {layer: w.detach().double().cpu() for layer, w in (mlp or {}).items()}
        self.model_known = mlp is not None  # {} = a model whose blocks expose no MLP output; None = no model
        self.prior = None if prior is None else prior.detach().double().cpu()

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
        return {layer: svd.write_coords(g) for layer, svd in self.decomposition.items()}

    def mlp_coords(self, g: Tensor) -> dict[int, Tensor]:
        """{layer: [m]} what each (RMS-weighted) MLP hidden unit writes along g."""
        return {layer: w @ g for layer, w in self.mlp.items()}

    def head_share(self, g: Tensor) -> dict[tuple[int, int], float]:
        """Each writer's share of the tower's write capacity along g (sums to 1): heads (layer, h) and,
        when the geometry knows them, MLPs (layer, -1)."""
        coords = self.head_coords(g)
        mlps = self.mlp_coords(g)
        total = (sum(float((c**2).sum()) for c in coords.values())
                 + sum(float((c**2).sum()) for c in mlps.values())) or 1.0
        out = {(layer, h): float((c[h] ** 2).sum()) / total for layer, c in coords.items() for h in range(c.shape[0])}
        out.update({(layer, -1): float((c**2).sum()) / total for layer, c in mlps.items()})
        return out

    def prior_score(self, concept: str, against: Sequence[str]) -> float:
        """Cosine between the read-out token's image-independent start and the concept's contrastive
        pulled-back direction C(γ ⊙ P (r̂_c − mean r̂_against)) (r̂_c alone when ``against`` is
        empty); 0 when the tower exposes no such start. Positive: with no evidence, the tower leans
        towards the concept rather than its neighbours (docs/edits.md, "Predicted presence")."""
        if self.prior is None:
            return 0.0
        r = self.joint_direction(concept)
        if against:
            r = r - torch.stack([self.joint_direction(c) for c in against]).mean(0)
        g = self.pullback @ r
        g = g - g.mean()
        k = self.prior - self.prior.mean()
        den = float(g.norm() * k.norm())
        return float(k @ g) / den if den > 0 else 0.0


_GAUSS_POINTS = 48


def _rms_activation(mean: Tensor, std: Tensor, act) -> Tensor:
    """sqrt E[act(z)²] for z ~ N(mean, std²) per hidden unit (Gauss–Hermite quadrature)."""
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(_GAUSS_POINTS)
    x, w = torch.tensor(x, dtype=torch.float64), torch.tensor(w / w.sum(), dtype=torch.float64)
    z = mean[:, None] + std[:, None] * x[None, :]
    with torch.no_grad():
        a = act(z.float()).double()
    return ((a**2) * w).sum(dim=1).clamp(min=0).sqrt()


@torch.no_grad()
def tower_writers(model) -> tuple[dict[int, Tensor], Tensor | None]:
    """Data-free extras of a model for the predicted presence: every block's MLP write rows [m, d]
    (centred, LayerScale folded, via the tower adapter) scaled by the RMS of their hidden unit under
    a unit-variance LayerNorm input (z_i ~ N(b_i + w_i·β, ‖w_i ⊙ γ‖²) through the block's own
    activation; RMS 1 where the MLP is not LayerNorm → Linear → activation), and the read-out
    token's image-independent start (``TowerAdapter.readout_start``; None where there is none)."""
    from sith.engine.towers import adapter_for

    tower = adapter_for(getattr(model, "model", model))
    mlps: dict[int, Tensor] = {}
    for layer in range(tower.num_layers):
        w = tower.mlp_output(layer)
        if w is None:
            continue
        w = w.detach().double().cpu()
        rms = torch.ones(w.shape[0], dtype=torch.float64)
        reader = tower.mlp_input(layer)
        if reader is not None and reader[1].weight.shape[0] == w.shape[0]:
            norm, fc, act = reader
            weight = fc.weight.detach().double().cpu()
            gamma = norm.weight.detach().double().cpu() if norm.weight is not None else torch.ones(weight.shape[1])
            beta = norm.bias.detach().double().cpu() if norm.bias is not None else torch.zeros(weight.shape[1])
            bias = fc.bias.detach().double().cpu() if fc.bias is not None else torch.zeros(weight.shape[0])
            rms = _rms_activation(bias + weight @ beta, (weight * gamma[None, :]).norm(dim=1), act)
        mlps[layer] = w * rms[:, None]
    start = tower.readout_start()
    return mlps, None if start is None else start.detach().double().cpu()


def preserving_pair(u: Tensor, keep: Tensor | None, lam: float, others: Tensor | None = None,
                    lam_others: float = 0.0) -> tuple[Tensor, Tensor]:
    """(u, v) with vᵀu = 1 and v = M⁻¹u / uᵀM⁻¹u, M = I + λ K Kᵀ + (λ_o / n_o) O Oᵀ.

    K = [n, k] the preserved directions (each weighted λ), O = [n, n_o] the *other* concepts'
    directions, a second, weaker term weighted as their second-moment matrix O Oᵀ / n_o, so that
    λ_o means the same for any vocabulary size. Minimises ‖T − I‖_F subject to T u = α u with the
    preservation penalty λ Σ‖T k − k‖² + (λ_o / n_o) Σ‖T o − o‖² (closed form, UCE-style);
    λ = λ_o = 0 gives v = u (orthogonal projection). Whatever M is, T u = α u exactly."""
    u = u.double()
    m = None
    if keep is not None and keep.numel() and lam > 0:
        k = keep.double()
        m = lam * k @ k.T
    if others is not None and others.numel() and lam_others > 0:
        o = others.double()
        extra = (lam_others / o.shape[1]) * o @ o.T
        m = extra if m is None else m + extra
    if m is None:
        return u, u / float(u @ u)
    m = m + torch.eye(u.numel(), dtype=torch.float64)
    w = torch.linalg.solve(m, u)
    return u, w / float(u @ w)


def orthogonal_pair(u: Tensor, keep: Tensor | None, lam: float, others: Tensor | None = None,
                    lam_others: float = 0.0) -> tuple[Tensor, Tensor]:
    """(v̂, v̂): the symmetric map T = I − (1 − α) v̂ v̂ᵀ of head_mlp_orthogonal, v̂ = the unit v of
    ``preserving_pair`` (same arguments). T leaves any write orthogonal to v̂ alone; at α = 0 it is
    the orthogonal projection off v̂."""
    _, v = preserving_pair(u, keep, lam, others, lam_others)
    v = v / v.norm()
    return v, v.clone()


# ------------------------------------------------------------------------------------------------
# Predicted effect


def kept_share(geometry: Geometry, multipliers: Multipliers, g: Tensor) -> float:
    """Signed share of the tower's write capacity along the unit residual direction g that the edit's
    heads and MLPs keep: Σ_w ⟨c_w, c'_w⟩ / Σ_w ‖c_w‖² (module docstring)."""
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
    for layer, w in geometry.mlp.items():
        before = w @ g
        den += float(before @ before)
        num += float(before @ (w @ multipliers.map_vector(g, "mlp", layer)))
    return num / den if den > 0 else 1.0


def predicted_presence(geometry: Geometry, multipliers: Multipliers, concepts: Sequence[str]) -> dict[str, float]:
    """Signed share of each concept's write capacity the edit keeps (module docstring)."""
    out = {}
    t_out = multipliers.maps_for("output")
    for concept in concepts:
        r = geometry.joint_direction(concept)
        share = kept_share(geometry, multipliers, geometry.pull_back(r))
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
