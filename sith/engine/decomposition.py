"""Per-head value-output matrices of a ViT block and their SVD (spec §1.3–1.5).

Convention (``CONVENTION``, part of every cache key): ln_1's affine is folded into W_V, the read
rows of W_V and the write columns of W_O are centred, and biases are left out of the matrix. Both
centrings are exact: the standardised LN input is zero-mean, and every consumer of the residual
stream (ln_1, ln_2, ln_post) removes the mean first. A LayerScale ``ls_1`` (rare in CLIP) scales
what a head writes, so it is folded into W_O as well; unfold it when writing weights back. Where
the factors live in each tower family (fused or separate q/k/v, BatchNorm readers, norms inside
attention) is the tower adapters' business (``sith.engine.towers``); this module only sees blocks.

W_VO^h = W_V^h W_O^h has rank <= head_dim, so its SVD never needs the dense d×d matrix: with thin
QR factorisations W_V = Q_a R_a and W_Oᵀ = Q_b R_b, W_VO = Q_a (R_a R_bᵀ) Q_bᵀ and the SVD of the
small head_dim × head_dim core gives the whole triplet set. Everything runs in float32 but the
core's SVD (float64, ``factor_svd``), which keeps σ within float32 accuracy of exact at about the
cost of the two thin QRs alone.
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

    def to(self, device: str | torch.device) -> LayerSVD:
        """The same decomposition on ``device`` (itself when it is already there)."""
        if self.S.device == torch.device(device):
            return self
        return LayerSVD(self.layer, self.U.to(device), self.S.to(device), self.V.to(device))

    def write_coords(self, directions: Tensor) -> Tensor:
        """diag(σ) Vᵀ g in float64: what each singular vector of each head writes along g. ``directions``
        [d] gives [H, r]; [N, d] gives [H, r, N] (many directions at once)."""
        v, s = self.V.double(), self.S.double()
        if directions.dim() == 1:
            return s * torch.einsum("hdr,d->hr", v, directions.double())
        return s[:, :, None] * torch.einsum("hdr,nd->hrn", v, directions.double())


def vo_factors(block: nn.Module, num_heads: int | None = None) -> tuple[Tensor, Tensor]:
    """Folded and centred per-head factors: W_V [H, d, dh] and W_O [H, dh, d], so W_VO^h = W_V[h] @ W_O[h].

    Row-vector form: for the standardised reading-norm input x̂ (zero mean, unit variance, no
    affine), head h writes ``A_h (x̂ W_V[h] + c_h) W_O[h]`` into the residual stream up to its mean,
    where A_h is the attention pattern and c_h = ``head_value_bias(block)[h]``. ``block`` is any
    attention block a tower adapter supports (``sith.engine.towers.block_access``); ``num_heads``
    is checked against the block's own when given.
    """
    return _access(block, num_heads).vo_factors()


def head_value_bias(block: nn.Module, num_heads: int | None = None) -> Tensor:
    """c_h = b_V^h + W_V^h β [H, dh]: the constant each head adds to its values (folded-bias semantics)."""
    return _access(block, num_heads).head_value_bias()


def _access(block: nn.Module, num_heads: int | None):
    from sith.engine.towers import block_access

    access = block_access(block)
    if num_heads is not None and num_heads != access.num_heads:
        raise InvalidInput("heads", f"block has {access.num_heads} heads, not {num_heads}")
    return access


def dense_vo(block: nn.Module, num_heads: int | None = None) -> Tensor:
    """The dense W_VO^h [H, d, d] (reference for tests and benchmarks; analysis never needs it)."""
    w_v, w_o = vo_factors(block, num_heads)
    return w_v @ w_o


# Bound on eps32·‖A‖_F·‖R⁻¹u_c‖ above which forming U as A·R⁻¹·U_c in float32 could lose more than
# this much orthonormality; such layers form Q explicitly from the Householder reflectors instead.
_FAST_BASIS_TOLERANCE = 1e-5


def _basis(reflectors: Tensor, tau: Tensor, r_tri: Tensor, factor: Tensor, core_vectors: Tensor) -> Tensor:
    """Q @ core_vectors for the thin QR ``factor = Q R`` stored as LAPACK reflectors (``geqrf``).

    Fast path: Q @ W = factor @ (R⁻¹ W): a small triangular solve and one matmul, both in the
    factor's dtype; Q is never formed (forming it costs as much as the QR itself). Their rounding
    error is at most about eps·‖A‖_F·‖R⁻¹w_j‖ per column, so when that bound
    exceeds ``_FAST_BASIS_TOLERANCE`` (an ill-conditioned factor) or is not finite (a singular R:
    an ablated head, a zero adaptation delta) the batch forms Q from the reflectors instead.
    """
    vectors = core_vectors.to(factor.dtype)
    solved = torch.linalg.solve_triangular(r_tri, vectors, upper=True)  # [H, r, r]
    eps = torch.finfo(factor.dtype).eps
    bound = eps * r_tri.norm(dim=(1, 2)).amax() * solved.norm(dim=1).amax()
    if float(bound) <= _FAST_BASIS_TOLERANCE:  # False for NaN/inf too
        # Written, row-major, into the reflectors' storage (dead by now: no fresh d×r buffer to
        # page in). Row-major like a cache round trip returns it, so fresh and cached SVDs give
        # bit-identical results downstream.
        flat = reflectors.transpose(1, 2)
        out = flat.view(reflectors.shape) if flat.is_contiguous() else None
        return torch.bmm(factor, solved, out=out) if out is not None else factor @ solved
    return torch.linalg.householder_product(reflectors, tau) @ vectors


# Below this σ_min/σ_max, V = CᵀU/σ would lose float64 accuracy; such batches orthonormalise CᵀU by QR.
_CORE_DIVIDE_RATIO = 1e-6


def _core_svd(core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a batch of small square cores (float64): U [H, r, r], S [H, r] descending, V [H, r, r].

    Through the eigenvectors U of C Cᵀ (LAPACK syevd: about half the time of gesdd at r = 64): the
    columns of CᵀU are σ_j v_j, so σ_j = ‖Cᵀu_j‖ (float64 accuracy relative to σ_max, not squared
    as √λ would be) and V = CᵀU/σ. When some σ_j is (near) zero — an ablated head, a zero
    adaptation delta — a QR of CᵀU gives V instead, with an orthonormal completion.
    """
    _, u = torch.linalg.eigh((core @ core.transpose(1, 2)).neg_())  # −CCᵀ: eigenvectors by descending σ
    w = core.transpose(1, 2) @ u  # [H, r, r], column j = σ_j v_j
    norms = w.norm(dim=1)  # [H, r]
    if float((norms[:, -1] / norms[:, 0].clamp_min(torch.finfo(norms.dtype).tiny)).min()) >= _CORE_DIVIDE_RATIO:
        v = w.div_(norms[:, None, :])
    else:
        v, r = torch.linalg.qr(w)
        diag = torch.diagonal(r, dim1=-2, dim2=-1)
        v = v * torch.where(diag < 0, -1.0, 1.0).to(v.dtype)[:, None, :]
        norms = diag.abs()
    # The norms can break the descending order only among σ equal to ~1e-16 relative: restore it.
    s = torch.cummin(norms, dim=-1).values
    return u, s, v


def factor_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of A @ B for batched A [H, d, r], B [H, r, d] via thin QR of both factors.

    Returns U [H, d, r], S [H, r] (descending), V [H, d, r] with the spec's sign rule: the entry
    of u_j with the largest magnitude is positive, and v_j flips with u_j. U and V are contiguous.

    Precision: float32 wherever float32 rounding is already the floor — the two QRs (backward
    stable: σ keep float32 accuracy relative to σ_max), the core product R_a R_bᵀ and the basis
    solves and products (their error is bounded and checked in ``_basis``) — and float64 for the
    core's SVD, which goes through C Cᵀ and would otherwise lose the small σ to the squaring.
    float64 inputs stay float64 throughout. Q is never formed on the fast path (see ``_basis``).
    """
    out_dtype = a.dtype
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    a_w = a.to(work)
    bt_w = b.to(work).transpose(1, 2)  # Bᵀ [H, d, r]
    d, r = a_w.shape[1], a_w.shape[2]
    if d < r or bt_w.shape[1] < bt_w.shape[2]:  # wide factors: R is not square, use plain QR
        q_a, r_a = torch.linalg.qr(a_w)
        q_b, r_b = torch.linalg.qr(bt_w)
        u_c, s, v_ch = torch.linalg.svd(r_a.double() @ r_b.double().transpose(1, 2))
        u = q_a @ u_c.to(work)
        v = q_b @ v_ch.transpose(1, 2).to(work)
    else:
        refl_a, tau_a = torch.geqrf(a_w)  # R in the upper triangle, Householder vectors below
        refl_b, tau_b = torch.geqrf(bt_w)
        r_a = refl_a[:, :r, :].triu()
        r_b = refl_b[:, :r, :].triu()
        u_c, s, v_c = _core_svd((r_a @ r_b.transpose(1, 2)).double())  # float64 SVD of the [H, r, r] core
        u = _basis(refl_a, tau_a, r_a, a_w, u_c)
        sign = _pivot_sign(u)
        u.mul_(sign)
        v = _basis(refl_b, tau_b, r_b, bt_w, v_c * sign.to(v_c.dtype))  # flip v_j with u_j in the small matrix
        return u.to(out_dtype), s.to(out_dtype), v.to(out_dtype)
    sign = _pivot_sign(u)
    u.mul_(sign)
    v.mul_(sign)
    return u.to(out_dtype), s.to(out_dtype), v.to(out_dtype)


def _pivot_sign(u: Tensor) -> Tensor:
    """[H, 1, r] ±1 making the largest-|entry| of each u_j positive: + when its max beats −min
    (two plain reductions; an argmax of |u| along the strided d axis costs several times more)."""
    return torch.where(u.amax(dim=1, keepdim=True) >= -u.amin(dim=1, keepdim=True), 1.0, -1.0).to(u.dtype)


def decompose_layer(block: nn.Module, num_heads: int | None, layer: int) -> LayerSVD:
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
    from sith.engine.towers import adapter_for

    tower = adapter_for(loaded.model)
    from sith.engine.memo import layer_svd  # computed once per process per (model, layer)

    with torch.no_grad():
        return {layer: layer_svd(loaded, layer,
                                 lambda layer=layer: decompose_layer(tower.blocks[layer], tower.num_heads, layer))
                for layer in resolve_layers(loaded.info, layers)}
