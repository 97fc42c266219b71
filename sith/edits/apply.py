"""Write W_VO^h ← U diag(α ⊙ σ) Vᵀ back into the STOCK open_clip layout.

Only the edited heads' ``out_proj`` columns and ``out_proj.bias`` change; ``in_proj`` and ``ln_1``
stay bit-identical, so the result loads into a plain ``open_clip.create_model`` with no SITH code.

With A = folded/centred W_V^h [d, dh] (unchanged) and M' = U diag(ασ) Vᵀ, the new centred write
matrix is B' = pinv(A) M' (exact: U spans col(A)). The per-column mean the centring removed (a
write along the all-ones direction, which every downstream LayerNorm discards) is added back so
α = 1 reproduces the stock weights. The head's constant value term c_h (attention weights sum to
one) used to contribute c_h W_O^h to the bias; ``out_proj.bias`` absorbs c_h (W_O^h − W_O^h') so
the constant is untouched, which is SITH's folded-bias semantics (only the VO matrix is edited).

Rank-one write maps (operators.py) multiply a head's write on the right, M' = U diag(ασ) Vᵀ T,
through the same path (so they are written from the base decomposition and revert exactly). A map
on the output site rewrites the final projection P ← P T (``visual.proj`` for open_clip, through
the tower adapter's ``set_projection``); a map on the "mlp" site rewrites a block's MLP output
weights W ← W T (row form; the tower adapter's ``mlp_output``/``write_mlp_output``, so the stock
``c_proj``/``fc2`` layout is kept and its bias is untouched). Those two are relative to the weights
they are given, so apply such edits to the base model (the CLI, the server and ``revert`` all do).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from sith.edits.multipliers import Multipliers
from sith.engine.decomposition import LayerSVD, vo_factors
from sith.engine.errors import InvalidInput
from sith.engine.towers import TowerAdapter, adapter_for, block_access, tower_kind

# A decomposition whose U leaves col(A) by more than this does not belong to these read weights.
SPAN_TOLERANCE = 1e-3


def _clip(model):
    return getattr(model, "model", model)  # accept a LoadedModel as well as a CLIP


@torch.no_grad()
def rewrite_head(block: nn.Module, num_heads: int, head: int, svd: LayerSVD, alpha: Tensor,
                 right: Tensor | Callable[[Tensor], Tensor] | None = None, *, w_v: Tensor | None = None) -> None:
    """Set head ``head`` of ``block`` to W_VO = U diag(α σ) Vᵀ [T] (in place, stock layout).

    ``right`` is T as a dense [d, d] matrix or as a function applying it to rows (rank-one maps:
    O(d) per row instead of O(d²)); ``w_v`` the block's value factors when the caller has them
    (writing a head never changes the value side, so one read serves every head of a layer).
    """
    if w_v is None:
        w_v, _ = vo_factors(block, num_heads)
    a = w_v[head].double()  # [d, dh]
    device = a.device
    u, s, v = (svd.U[head].to(device).double(), svd.S[head].to(device).double(), svd.V[head].to(device).double())
    alpha = alpha.to(device)
    pinv_a = torch.linalg.pinv(a)
    coords = pinv_a @ u  # [dh, r]: U in A's coordinates
    if (a @ coords - u).abs().max() > SPAN_TOLERANCE:
        raise InvalidInput("decomposition", f"layer {svd.layer} head {head}: the decomposition does not match "
                           "this model's value weights (decomposed from a different model?)")
    b_new = coords @ torch.diag(alpha.double() * s) @ v.T  # [dh, d], centred write rows
    if callable(right):
        b_new = right(b_new)
    elif right is not None:
        b_new = b_new @ right.to(device).double()

    # The tower adapter's block writer adds back the removed mean, unfolds LayerScale (and any
    # norm inside attention), compensates the output bias for c_h and writes stock layout.
    block_access(block).write_head(head, b_new)


def apply_multipliers(model, multipliers: Multipliers, decomposition: dict[int, LayerSVD], *,
                      skip_unchanged: bool = True, inplace: bool = False):
    """A copy of ``model`` (an open_clip CLIP) with every head rewritten as U diag(α σ) Vᵀ.

    ``decomposition`` must be the BASE model's (see multipliers.py); the model passed may be the
    base or any edit of it (same read weights), which is how re-applying and reverting work.
    ``skip_unchanged`` leaves heads whose α are all 1 bit-identical.
    """
    clip = _clip(model)
    edited = clip if inplace else copy.deepcopy(clip)
    tower = adapter_for(edited)
    blocks = tower.blocks
    num_heads = tower.num_heads
    for layer, alpha in multipliers.values.items():
        if layer not in decomposition:
            raise InvalidInput("decomposition", f"layer {layer} is edited but was not decomposed "
                               f"(decomposed: {sorted(decomposition)})")
        if not 0 <= layer < len(blocks):
            raise InvalidInput("multipliers", f"layer {layer} does not exist (model has {len(blocks)} blocks)")
        svd = decomposition[layer]
        if tuple(alpha.shape) != tuple(svd.S.shape):
            raise InvalidInput("multipliers", f"layer {layer}: shape {tuple(alpha.shape)} does not match the "
                               f"decomposition's {tuple(svd.S.shape)}")
        w_v = None
        for head in range(num_heads):
            mapped = bool(multipliers.maps_for("head", layer, head))
            if skip_unchanged and not mapped and bool((alpha[head] == 1.0).all()):
                continue
            if w_v is None:
                w_v, _ = vo_factors(blocks[layer], num_heads)
            right = partial(_map_rows, multipliers, "head", layer, head) if mapped else None
            rewrite_head(blocks[layer], num_heads, head, svd, alpha[head], right, w_v=w_v)
    for site, layer, head in multipliers.mapped_writers():
        if site == "head" and not (0 <= head < num_heads):
            raise InvalidInput("multipliers", f"layer {layer} head {head} does not exist ({num_heads} heads)")
        if site == "output":
            _rewrite_output(tower, multipliers.write_matrix("output"))
        if site == "mlp":
            _rewrite_mlp(tower, layer, multipliers)
    return edited


def _map_rows(multipliers: Multipliers, site: str, layer: int, head: int, rows: Tensor) -> Tensor:
    """rows T₁T₂… for a writer's rank-one maps T = I − (1 − a) u vᵀ, without forming the dense d×d T:
    O(rows·d) per map, where ``rows @ write_matrix(...)`` costs O(rows·d²) plus O(d²) to build T
    (the step that made apply+export grow faster than the parameter count with the width)."""
    rows = rows.to(torch.float64, copy=True)   # one copy, then rank-one updates in place (BLAS ger)
    for m in multipliers.maps_for(site, layer, head):
        u, v = (t.to(rows.device) for t in multipliers.pairs[m.pair])
        if rows.shape[-1] != u.shape[0]:
            raise InvalidInput("multipliers", f"the {site} write map has width {u.shape[0]}, but layer {layer} "
                               f"writes width {rows.shape[-1]}")
        rows.addr_(rows @ u, v, alpha=-(1.0 - m.alpha))
    return rows


@torch.no_grad()
def _rewrite_mlp(tower: TowerAdapter, layer: int, multipliers: Multipliers) -> None:
    """Block ``layer``'s MLP write W ← W T (row form [m, d]: every hidden unit's write w becomes w T),
    read and written through the tower adapter (LayerScale folded/unfolded, stock layout)."""
    if not 0 <= layer < tower.num_layers:
        raise InvalidInput("multipliers", f"MLP map on layer {layer}: the tower has {tower.num_layers} blocks")
    w = tower.mlp_output(layer)
    if w is None:
        raise InvalidInput("operator", f"layer {layer} of the {tower.family} tower has no MLP output to edit; "
                           "use head_project")
    tower.write_mlp_output(layer, _map_rows(multipliers, "mlp", layer, -1, w))


@torch.no_grad()
def _rewrite_output(tower: TowerAdapter, right: Tensor) -> None:
    """The embedding e ← e T (row form), written by the tower adapter into its final linear layer
    (P ← P T, and its bias where it has one) in the family's stock layout: open_clip ViT/CoCa/CLIPA,
    timm towers whose readout ends in a Linear, transformers CLIP."""
    proj = tower.output_projection()
    if proj is None:
        raise InvalidInput("operator", f"output_projection: the {tower_kind(tower.model)} vision tower "
                           f"({tower.family}) exposes no final linear projection to rewrite; use a head operator")
    if proj.shape[1] != right.shape[0]:
        raise InvalidInput("multipliers", f"the output write map is {tuple(right.shape)}, but this model's final "
                           f"projection is {tuple(proj.shape)}")
    tower.rewrite_output(right)


def revert(model, decomposition: dict[int, LayerSVD]):
    """The base model back from any head edit of it: every decomposed head rewritten with α = 1.

    Output and MLP write maps are relative to the weights they were applied to, so an edit that
    carries them is reverted by rebuilding from the base model (``sith edit revert`` does)."""
    ones = Multipliers({layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()})
    return apply_multipliers(model, ones, decomposition, skip_unchanged=False)
