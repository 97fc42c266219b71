"""Explain one image: which heads and singular vectors make up its embedding, and what they mean.

SITH explains weights without data; this ties that weight-space view to a concrete input. For one
image and each analysed layer l and head h, the head's write into the CLS token is split along the
head's own SVD (``decomposition.py``, folded/centred convention):

    write_{l,h} = m_{l,h} W_VO^h + c_h W_O^h = Σ_j a_j v_j  +  c_h W_O^h
    m_{l,h} = Σ_t A_h[cls, t] x̂_t          (attention-weighted, standardised ln_1 input)
    a_j     = σ_j (m_{l,h} · u_j)           (the image's coordinate on singular vector j)

``c_h W_O^h`` is the head's constant (its value bias; attention weights sum to one): it is the same
for every image and edits never change it (folded-bias semantics), so it is reported apart as the
head's ``constant``. The image-dependent part ``a_j v_j`` is exactly what an edit of vector j scales.

Each piece is pushed to the joint space through ln_post and the projection **linearised at this
image**: ln_post's mean and standard deviation are frozen at the image's own final CLS residual
x_L, which makes ``L(δ) = γ ⊙ (δ − mean δ) / σ(x_L)`` linear and exact for the sum: the image's
(unnormalised) embedding z = (L(x_L) + β) P = Σ_pieces L(piece) P + β P. A piece's **share** is its
projection on the embedding's own direction, divided by the embedding's length:

    share = (L(piece) P) · ẑ / ‖z‖

so the shares of every piece of the residual stream (patch embedding, every head, every MLP, every
bias, and β P) add up to exactly 1. A positive share pushes the embedding towards where it ends up;
a negative one pulls away. Only the direct path to the output is counted: what a head writes also
changes what later layers read, and that indirect effect is not attributed (as in the paper's
"direct effect" decompositions of CLIP's image representation).

``concepts`` of a vector are its COMP explanation over the analyzer's dictionary, the same words
``sith explain``/``sith find`` show; they describe +v_j, so a negative coefficient a_j means the
image writes *against* those concepts.

Supported towers: open_clip ViTs whose embedding is read from the CLS token (``pool_type="tok"``,
no attention pooler) with ``nn.MultiheadAttention`` blocks: every CLIP ViT open_clip ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sith.engine.decomposition import LayerSVD, head_value_bias, resolve_layers, vo_factors
from sith.engine.errors import InvalidInput
from sith.engine.sparse import DEFAULT_COHERENCE, DEFAULT_K


@dataclass
class VectorContribution:
    """One singular vector's part in one image's embedding."""

    layer: int
    head: int
    index: int  # j, the vector's rank within its head (0 = largest σ)
    sigma: float
    coefficient: float  # a_j = σ_j (m · u_j): how much of +v_j the head writes into the CLS token
    share: float  # (L(a_j v_j) P) · ẑ / ‖z‖: its share of the image embedding (all shares sum to 1)
    concepts: list[tuple[str, float]] = field(default_factory=list)  # +v_j's explanation (COMP)


@dataclass
class HeadContribution:
    """One head's part in one image's embedding: its image-dependent write and its constant."""

    layer: int
    head: int
    share: float  # Σ_j share of its vectors (the image-dependent write)
    constant: float  # share of c_h W_O^h, the same for every image (not editable)
    vectors: list[VectorContribution]  # its strongest vectors for this image, by |share|


@dataclass
class ImageAttribution:
    """Direct attribution of one image's embedding to heads and singular vectors (module docstring).

    ``heads`` and ``vectors`` are ranked by |share|, largest first. ``analysed_share`` is the sum of
    every analysed head's ``share`` (image-dependent writes only); ``rest`` = 1 − analysed_share −
    Σ constants is what everything else contributes (patch embedding, other layers, MLPs, biases).
    ``image_concepts`` are the dictionary concepts closest to the image embedding (cosine).
    """

    model: str
    model_hash: str
    image: str
    layers: list[int]
    embedding_norm: float  # ‖z‖, the unnormalised embedding's length
    analysed_share: float
    constant_share: float
    rest: float
    heads: list[HeadContribution]
    vectors: list[VectorContribution]
    image_concepts: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- the math


@dataclass
class RawAttribution:
    """The dictionary-free result for one image: per analysed layer, [H, r] coefficients and shares."""

    embedding: Tensor  # [D] unnormalised z
    coefficients: dict[int, Tensor]  # a_j per layer, [H, r]
    shares: dict[int, Tensor]  # share per layer, [H, r]
    constants: dict[int, Tensor]  # constant share per layer, [H]
    writes: dict[int, Tensor]  # centred head writes at the CLS token per layer, [H, d] (for checks)


def _check_tower(model: nn.Module) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise InvalidInput("model", f"image attribution needs an open_clip ViT tower, got {type(visual).__name__}")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise InvalidInput("model", "image attribution reads the CLS token; this tower pools differently "
                           f"(pool_type={getattr(visual, 'pool_type', '?')!r}, attention pool: "
                           f"{getattr(visual, 'attn_pool', None) is not None})")
    for block in visual.transformer.resblocks:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise InvalidInput("model", "image attribution needs nn.MultiheadAttention blocks")
    return visual


def _standardise(x: Tensor, eps: float) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def _cls_attention(block: nn.Module, x: Tensor) -> Tensor:
    """Attention of the CLS query over all tokens, per head: [H, T] (x: [T, d], one image)."""
    attn = block.attn
    d = attn.embed_dim
    heads = attn.num_heads
    dh = d // heads
    h = block.ln_1(x)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = h[:1] @ w[:d].T + (b[:d] if b is not None else 0)  # [1, d]
    k = h @ w[d : 2 * d].T + (b[d : 2 * d] if b is not None else 0)  # [T, d]
    q = q.reshape(1, heads, dh).transpose(0, 1)  # [H, 1, dh]
    k = k.reshape(-1, heads, dh).transpose(0, 1)  # [H, T, dh]
    scores = (q @ k.transpose(1, 2)).squeeze(1) / dh**0.5  # [H, T]
    return scores.softmax(dim=-1)


def pixels_for(loaded, image: Any) -> Tensor:
    """[1, 3, S, S] model input from a path, a PIL image or an already preprocessed tensor."""
    if isinstance(image, Tensor):
        pixels = image if image.dim() == 4 else image.unsqueeze(0)
        if pixels.dim() != 4 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
            raise InvalidInput("image", f"expected one preprocessed image [3, H, W], got shape {list(image.shape)}")
        return pixels.float()
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InvalidInput("image", f"file not found: {path}")
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidInput("image", f"cannot read {path.name} as an image: {exc}") from exc
    if not isinstance(image, Image.Image):
        raise InvalidInput("image", f"expected an image path, a PIL image or a tensor, got {type(image).__name__}")
    if loaded.preprocess is None:
        raise InvalidInput("image", "this model has no image preprocessing transform; pass a preprocessed tensor")
    return loaded.preprocess(image.convert("RGB")).unsqueeze(0)


@torch.no_grad()
def raw_attribution(loaded, pixels: Tensor, decomposition: dict[int, LayerSVD]) -> RawAttribution:
    """Coefficients a_j and shares of every singular vector of the decomposed layers for one image."""
    model = loaded.model
    visual = _check_tower(model)
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    inputs: dict[int, Tensor] = {}
    final: list[Tensor] = []

    def keep_block(layer: int):
        def hook(_module, args):
            x = args[0]
            inputs[layer] = (x[0] if batch_first else x[:, 0]).detach()  # [T, d] of the one image
        return hook

    def keep_final(_module, args):
        x = args[0]
        final.append((x[0, 0] if x.dim() == 3 else x[0]).detach())  # tokens [B, T, d] or pooled [B, d]

    handles = [blocks[layer].register_forward_pre_hook(keep_block(layer)) for layer in decomposition]
    handles.append(visual.ln_post.register_forward_pre_hook(keep_final))
    device = next(model.parameters()).device
    try:
        z = model.encode_image(pixels.to(device)).float()[0]
    finally:
        for handle in handles:
            handle.remove()

    ln = visual.ln_post
    x_final = final[0].float()
    sigma_final = torch.sqrt(x_final.var(unbiased=False) + ln.eps)
    gamma = ln.weight.float() if ln.weight is not None else torch.ones_like(x_final)
    proj = visual.proj.float() if visual.proj is not None else None
    direction = F.normalize(z, dim=0)
    norm = z.norm()

    def to_share(pieces: Tensor) -> Tensor:
        """share of residual pieces [..., d] under the frozen ln_post."""
        centred = pieces - pieces.mean(dim=-1, keepdim=True)
        joint = (gamma * centred) / sigma_final
        if proj is not None:
            joint = joint @ proj
        return (joint @ direction) / norm

    coefficients, shares, constants, writes = {}, {}, {}, {}
    heads = loaded.info.heads
    for layer, svd in decomposition.items():
        block = blocks[layer]
        x = inputs[layer].float()
        attention = _cls_attention(block, x)  # [H, T]
        x_hat = _standardise(x, block.ln_1.eps)  # [T, d]
        m = attention @ x_hat  # [H, d]
        u, s, v = svd.U.to(device).float(), svd.S.to(device).float(), svd.V.to(device).float()
        a = torch.einsum("hd,hdr->hr", m, u) * s  # [H, r]
        coefficients[layer] = a.cpu()
        shares[layer] = (a * to_share(v.transpose(1, 2))).cpu()  # v_j columns -> [H, r, d] rows
        w_v, w_o = vo_factors(block, heads)
        c = head_value_bias(block, heads).float()  # [H, dh]
        constant = torch.einsum("hk,hkd->hd", c, w_o.float())  # [H, d]
        constants[layer] = to_share(constant).cpu()
        writes[layer] = (torch.einsum("hd,hdk,hke->he", m, w_v.float(), w_o.float()) + constant).cpu()
    return RawAttribution(embedding=z.cpu(), coefficients=coefficients, shares=shares, constants=constants,
                          writes=writes)


# ------------------------------------------------------------------------------ with concepts


def _label(image: Any) -> str:
    if isinstance(image, (str, Path)):
        return Path(image).name
    return getattr(image, "filename", "") or type(image).__name__


def attribute_image(
    analyzer,
    image: Any,
    layers: int | Sequence[int] | None = None,
    top: int = 10,
    vectors_per_head: int = 3,
    method: str = "comp",
    k: int = DEFAULT_K,
    coherence: float = DEFAULT_COHERENCE,
    image_concepts: int = 5,
) -> ImageAttribution:
    """Which heads and singular vectors of ``layers`` (default the last four) make up ``image``'s
    embedding, with each vector's concepts from ``analyzer``'s dictionary (module docstring).

    ``image``: a file path, a PIL image, or a preprocessed tensor [3, H, W]. ``top`` heads and
    ``top`` vectors are returned, ranked by |share|.
    """
    for name, value in (("top", top), ("vectors_per_head", vectors_per_head), ("image_concepts", image_concepts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "top" else 0):
            raise InvalidInput(name, f"must be a {'positive' if name == 'top' else 'non-negative'} integer, got {value!r}")
    loaded = analyzer.loaded
    _check_tower(loaded.model)
    layer_list = resolve_layers(loaded.info, layers)
    pixels = pixels_for(loaded, image)
    decomposition = analyzer.decomposition(layer_list)
    raw = raw_attribution(loaded, pixels, decomposition)

    def vector(layer: int, head: int, j: int) -> VectorContribution:
        rank = raw.shares[layer].shape[1]
        codes = analyzer.codes(layer, method, k, coherence)
        row = head * rank + j
        names = analyzer.dictionary.concepts
        concepts = [(names[i], round(c, 6)) for i, c in
                    zip(codes.indices[row].tolist(), codes.coefficients[row].tolist()) if c > 0]
        return VectorContribution(layer=layer, head=head, index=j, sigma=float(decomposition[layer].S[head, j]),
                                  coefficient=float(raw.coefficients[layer][head, j]),
                                  share=float(raw.shares[layer][head, j]), concepts=concepts)

    ranked = sorted(((-abs(float(s)), layer, h, j) for layer, shares in raw.shares.items()
                     for (h, j), s in ((divmod(i, shares.shape[1]), s) for i, s in enumerate(shares.flatten().tolist()))))
    top_vectors = [vector(layer, h, j) for _, layer, h, j in ranked[:top]]
    head_rows = []
    for layer, shares in raw.shares.items():
        for h in range(shares.shape[0]):
            head_rows.append((-abs(float(shares[h].sum())), layer, h))
    head_rows.sort()
    heads = []
    for _, layer, h in head_rows[:top]:
        order = sorted(range(raw.shares[layer].shape[1]), key=lambda j: (-abs(float(raw.shares[layer][h, j])), j))
        heads.append(HeadContribution(layer=layer, head=h, share=float(raw.shares[layer][h].sum()),
                                      constant=float(raw.constants[layer][h]),
                                      vectors=[vector(layer, h, j) for j in order[:vectors_per_head]]))
    analysed = float(sum(s.sum() for s in raw.shares.values()))
    constant = float(sum(c.sum() for c in raw.constants.values()))
    concepts: list[tuple[str, float]] = []
    if image_concepts:
        dictionary = analyzer.dictionary
        sims = dictionary.embeddings.float() @ F.normalize(raw.embedding, dim=0).to(dictionary.embeddings.device)
        best = sims.topk(min(image_concepts, sims.shape[0]))
        concepts = [(dictionary.concepts[i], round(float(v), 6)) for v, i in zip(best.values, best.indices.tolist())]
    return ImageAttribution(model=loaded.name, model_hash=loaded.hash, image=_label(image), layers=layer_list,
                            embedding_norm=float(raw.embedding.norm()), analysed_share=analysed,
                            constant_share=constant, rest=1.0 - analysed - constant, heads=heads,
                            vectors=top_vectors, image_concepts=concepts)
