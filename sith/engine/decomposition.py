"""Per-head value-output matrices of a ViT block and their SVD (spec §1.3–1.5).

Convention (``CONVENTION``, part of every cache key): ln_1's affine is folded into W_V, the read
rows of W_V and the write columns of W_O are centred, and biases are left out of the matrix. Both
centrings are exact: the standardised LN input is zero-mean, and every consumer of the residual
stream (ln_1, ln_2, ln_post) removes the mean first. A LayerScale ``ls_1`` (rare in CLIP) scales
what a head writes, so it is folded into W_O as well; unfold it when writing weights back.

W_VO^h = W_V^h W_O^h has rank <= head_dim, so its SVD never needs the dense d×d matrix: with thin
QR factorisations W_V = Q_a R_a and W_Oᵀ = Q_b R_b, W_VO = Q_a (R_a R_bᵀ) Q_bᵀ and the SVD of the
small head_dim × head_dim core gives the whole triplet set. The factor maths runs in float64 (the
factors are tiny), which makes the result closer to exact than a dense fp32 SVD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sith.engine.errors import InvalidInput

CONVENTION = "foldln-centred-right-v1"
DEFAULT_LAST_LAYERS = 4


@dataclass
class LayerSVD:
    """W_VO^h = U[h] @ diag(S[h]) @ V[h].T (right-multiplication form: head output = x̂ W_VO)."""

    layer: int
    U: Tensor  # [H, d, r]  read directions (left singular vectors)
    S: Tensor  # [H, r] descending
    V: Tensor  # [H, d, r]  columns are the right singular vectors (write directions)


def _layer_scale(block: nn.Module) -> Tensor | None:
    ls = getattr(block, "ls_1", None)
    gamma = getattr(ls, "gamma", None)
    return None if gamma is None else gamma.detach()


def vo_factors(block: nn.Module, num_heads: int) -> tuple[Tensor, Tensor]:
    """Folded and centred per-head factors: W_V [H, d, dh] and W_O [H, dh, d], so W_VO^h = W_V[h] @ W_O[h].

    Row-vector form: for the standardised ln_1 input x̂ (zero mean, unit variance, no affine), head
    h writes ``A_h (x̂ W_V[h] + c_h) W_O[h]`` into the residual stream up to its mean, where A_h is the
    attention pattern and c_h = ``head_value_bias(block, num_heads)[h]``.
    """
    attn = block.attn
    d = attn.embed_dim
    dh = d // num_heads
    w_v = attn.in_proj_weight.detach()[2 * d : 3 * d]  # [d_out, d_in], y = x Wᵀ
    w_v = w_v * block.ln_1.weight.detach()[None, :]  # fold γ₁ into the read columns
    w_v = w_v - w_v.mean(dim=1, keepdim=True)  # centre each read row
    w_out = attn.out_proj.weight.detach()  # [d_out, d_in]; columns of head h = its write map
    gamma = _layer_scale(block)
    if gamma is not None:
        w_out = w_out * gamma[:, None]
    w_out = w_out - w_out.mean(dim=0, keepdim=True)  # centre each write column
    w_v_heads = w_v.reshape(num_heads, dh, d).transpose(1, 2)  # [H, d, dh]
    w_o_heads = w_out.reshape(d, num_heads, dh).permute(1, 2, 0)  # [H, dh, d]
    return w_v_heads.contiguous(), w_o_heads.contiguous()


def head_value_bias(block: nn.Module, num_heads: int) -> Tensor:
    """c_h = b_V^h + W_V^h β₁ [H, dh]: the constant each head adds to its values (folded-bias semantics)."""
    attn = block.attn
    d = attn.embed_dim
    w_v = attn.in_proj_weight.detach()[2 * d : 3 * d]
    bias = attn.in_proj_bias.detach()[2 * d : 3 * d] if attn.in_proj_bias is not None else w_v.new_zeros(d)
    c = bias + w_v @ block.ln_1.bias.detach()
    return c.reshape(num_heads, d // num_heads)


def dense_vo(block: nn.Module, num_heads: int) -> Tensor:
    """The dense W_VO^h [H, d, d] (reference for tests and benchmarks; analysis never needs it)."""
    w_v, w_o = vo_factors(block, num_heads)
    return w_v @ w_o


def factor_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of A @ B for batched A [H, d, r], B [H, r, d] via thin QR of both factors.

    Returns U [H, d, r], S [H, r] (descending), V [H, d, r] with the spec's sign rule: the entry
    of u_j with the largest magnitude is positive, and v_j flips with u_j.
    """
    dtype = a.dtype
    a64, b64 = a.double(), b.double()
    q_a, r_a = torch.linalg.qr(a64)  # [H, d, r], [H, r, r]
    q_b, r_b = torch.linalg.qr(b64.transpose(1, 2))  # Bᵀ = Q_b R_b
    u_c, s, v_ch = torch.linalg.svd(r_a @ r_b.transpose(1, 2))
    u = q_a @ u_c
    v = q_b @ v_ch.transpose(1, 2)
    pivot = u.abs().argmax(dim=1, keepdim=True)  # [H, 1, r]
    sign = torch.sign(torch.gather(u, 1, pivot))
    sign[sign == 0] = 1.0
    return (u * sign).to(dtype), s.to(dtype), (v * sign).to(dtype)


def decompose_layer(block: nn.Module, num_heads: int, layer: int) -> LayerSVD:
    w_v, w_o = vo_factors(block, num_heads)
    u, s, v = factor_svd(w_v, w_o)
    return LayerSVD(layer=layer, U=u, S=s, V=v)


def _index_list(values: int | Sequence[int], field: str) -> list[int]:
    items = [values] if isinstance(values, int) else list(values)
    for i, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(field, f"entry {i} ({value!r}) is not an integer")
    return items


def _resolve(values: int | Sequence[int], count: int, field: str, out_of_range: Callable[[int], str]) -> list[int]:
    """Sorted, de-duplicated non-negative indices into ``count`` items (negative indices allowed)."""
    items = _index_list(values, field)
    if not items:
        raise InvalidInput(field, f"no {field} given")
    for value in items:
        if not -count <= value < count:
            raise InvalidInput(field, out_of_range(value))
    return sorted({value % count for value in items})


def resolve_layers(info, layers: int | Sequence[int] | None) -> list[int]:
    """Sorted, de-duplicated non-negative layer indices; default the last four (spec §1.1)."""
    if layers is None:
        return list(range(max(0, info.layers - DEFAULT_LAST_LAYERS), info.layers))
    return _resolve(layers, info.layers, "layers",
                    lambda layer: f"layer {layer} is out of range for a tower with {info.layers} blocks "
                                  f"(valid: 0..{info.layers - 1} or -{info.layers}..-1)")


def resolve_heads(info, heads: int | Sequence[int] | None) -> list[int]:
    """Sorted, de-duplicated head indices (negative allowed); default all heads."""
    if heads is None:
        return list(range(info.heads))
    return _resolve(heads, info.heads, "heads",
                    lambda head: f"head {head} is out of range for {info.heads} heads (valid: 0..{info.heads - 1})")


def decompose(loaded, layers: int | Sequence[int] | None = None) -> dict[int, LayerSVD]:
    """SVD of every head's folded/centred W_VO in the chosen layers (default the last four)."""
    blocks = loaded.model.visual.transformer.resblocks
    heads = loaded.info.heads
    with torch.no_grad():
        return {layer: decompose_layer(blocks[layer], heads, layer) for layer in resolve_layers(loaded.info, layers)}
