"""Write W_VO^h ← U diag(α ⊙ σ) Vᵀ back into the STOCK open_clip layout.

Only the edited heads' ``out_proj`` columns and ``out_proj.bias`` change; ``in_proj`` and ``ln_1``
stay bit-identical, so the result loads into a plain ``open_clip.create_model`` with no SITH code.

With A = folded/centred W_V^h [d, dh] (unchanged) and M' = U diag(ασ) Vᵀ, the new centred write
matrix is B' = pinv(A) M' (exact: U spans col(A)). The per-column mean the centring removed (a
write along the all-ones direction, which every downstream LayerNorm discards) is added back so
α = 1 reproduces the stock weights. The head's constant value term c_h (attention weights sum to
one) used to contribute c_h W_O^h to the bias; ``out_proj.bias`` absorbs c_h (W_O^h − W_O^h') so
the constant is untouched, which is SITH's folded-bias semantics (only the VO matrix is edited).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from sith.edits.multipliers import Multipliers
from sith.engine.decomposition import LayerSVD, head_value_bias, vo_factors
from sith.engine.errors import InvalidInput

# A decomposition whose U leaves col(A) by more than this does not belong to these read weights.
SPAN_TOLERANCE = 1e-3


def _clip(model):
    return getattr(model, "model", model)  # accept a LoadedModel as well as a CLIP


def _layer_scale(block: nn.Module) -> Tensor | None:
    gamma = getattr(getattr(block, "ls_1", None), "gamma", None)
    return None if gamma is None else gamma.detach().double()


@torch.no_grad()
def rewrite_head(block: nn.Module, num_heads: int, head: int, svd: LayerSVD, alpha: Tensor) -> None:
    """Set head ``head`` of ``block`` to W_VO = U diag(α σ) Vᵀ (in place, stock layout)."""
    attn = block.attn
    d = attn.embed_dim
    dh = d // num_heads
    cols = slice(head * dh, (head + 1) * dh)
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

    weight = attn.out_proj.weight  # [d_out, d_in]
    gamma = _layer_scale(block)
    old_raw = weight[:, cols].double().T  # [dh, d] raw W_O^h (out_proj units)
    old_folded = old_raw * gamma[None, :] if gamma is not None else old_raw
    removed_mean = old_folded.mean(dim=1, keepdim=True)  # what the centring of W_O took out
    new_folded = b_new + removed_mean
    new_raw = new_folded / gamma[None, :] if gamma is not None else new_folded

    c_h = head_value_bias(block, num_heads)[head].double()  # [dh]
    if attn.out_proj.bias is not None:
        attn.out_proj.bias += (c_h @ (old_raw - new_raw)).to(attn.out_proj.bias.dtype)
    elif (c_h.abs() > 0).any():
        raise InvalidInput("model", "out_proj has no bias to absorb the head's constant value term")
    weight[:, cols] = new_raw.T.to(weight.dtype)


def apply_multipliers(model, multipliers: Multipliers, decomposition: dict[int, LayerSVD], *,
                      skip_unchanged: bool = True, inplace: bool = False):
    """A copy of ``model`` (an open_clip CLIP) with every head rewritten as U diag(α σ) Vᵀ.

    ``decomposition`` must be the BASE model's (see multipliers.py); the model passed may be the
    base or any edit of it (same read weights), which is how re-applying and reverting work.
    ``skip_unchanged`` leaves heads whose α are all 1 bit-identical.
    """
    clip = _clip(model)
    edited = clip if inplace else copy.deepcopy(clip)
    blocks = edited.visual.transformer.resblocks
    num_heads = blocks[0].attn.num_heads
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
        for head in range(num_heads):
            if skip_unchanged and bool((alpha[head] == 1.0).all()):
                continue
            rewrite_head(blocks[layer], num_heads, head, svd, alpha[head])
    return edited


def revert(model, decomposition: dict[int, LayerSVD]):
    """The base model back from any edit of it: every decomposed head rewritten with α = 1."""
    ones = Multipliers({layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()})
    return apply_multipliers(model, ones, decomposition, skip_unchanged=False)
