"""Folded/centred W_VO factors and their QR-based SVD: exact against dense SVD and the real MHA."""

from __future__ import annotations

import open_clip
import pytest
import torch

from sith.engine.decomposition import (
    decompose,
    decompose_layer,
    dense_vo,
    head_value_bias,
    resolve_heads,
    resolve_layers,
    vo_factors,
)
from sith.engine.errors import InvalidInput
from sith.engine.models import VisionInfo, load_model


def _perturb_affines(block: torch.nn.Module, seed: int) -> None:
    """Random-init LayerNorms are γ=1, β=0 and biases 0; make folding non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (block.ln_1.weight, block.ln_1.bias, block.attn.in_proj_bias, block.attn.out_proj.bias):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p is block.ln_1.weight else 0.0))


def _check_exact(model: torch.nn.Module, layers: list[int], dense_heads: slice = slice(None)) -> None:
    """Dense fp64 SVD is the slow part, so ``dense_heads`` limits which heads it checks σ on."""
    blocks = model.visual.transformer.resblocks
    heads = blocks[0].attn.num_heads
    for layer in layers:
        _perturb_affines(blocks[layer], layer)
        svd = decompose_layer(blocks[layer], heads, layer)
        dense = dense_vo(blocks[layer], heads).double()
        r = blocks[layer].attn.head_dim
        assert svd.U.shape == (heads, dense.shape[1], r) and svd.S.shape == (heads, r)
        reference = torch.linalg.svdvals(dense[dense_heads])[:, :r]
        torch.testing.assert_close(svd.S[dense_heads].double(), reference, rtol=1e-5, atol=1e-6 * reference.max().item())
        rebuilt = svd.U.double() @ torch.diag_embed(svd.S.double()) @ svd.V.double().transpose(1, 2)
        relative = (rebuilt - dense).norm(dim=(1, 2)) / dense.norm(dim=(1, 2))
        assert relative.max() < 1e-5
        eye = torch.eye(r, dtype=torch.float64).expand(heads, r, r)
        torch.testing.assert_close(svd.U.double().transpose(1, 2) @ svd.U.double(), eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(svd.V.double().transpose(1, 2) @ svd.V.double(), eye, atol=1e-5, rtol=0)
        assert svd.V.mean(dim=1).abs().max() < 1e-6  # right singular vectors are zero-mean
        assert (svd.S[:, :-1] >= svd.S[:, 1:]).all()
        # sign rule: the largest-|entry| of every u_j is positive
        pivot = svd.U.abs().argmax(dim=1, keepdim=True)
        assert (torch.gather(svd.U, 1, pivot) > 0).all()


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32").eval()


def test_exact_svd_vit_b32(vit_b32):
    _check_exact(vit_b32, [0, 11], dense_heads=slice(0, 12, 7))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~30 s on an idle 2-core CPU; creating ViT-L-14 dominates
def test_exact_svd_vit_l14():
    torch.manual_seed(1)
    model = open_clip.create_model("ViT-L-14").eval()
    _check_exact(model, [0, 23], dense_heads=slice(0, 16, 5))


def test_rank_is_head_dim_not_64():
    """ViT-H-style heads (head_dim 80) keep all 80 directions."""
    torch.manual_seed(2)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 160, "head_width": 80, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
    }
    model = open_clip.model.CLIP(**cfg).eval()
    assert model.visual.transformer.resblocks[0].attn.head_dim == 80
    _check_exact(model, [0])


@pytest.mark.parametrize("layer_scale", [False, True])
def test_folding_matches_multihead_attention_forward(layer_scale):
    """Centred real block output of one head == A_h (x̂ W_V + c_h) W_O with our folded factors."""
    torch.manual_seed(3)
    width, heads, tokens = 64, 4, 5
    block = open_clip.transformer.ResidualAttentionBlock(width, heads, ls_init_value=0.3 if layer_scale else None)
    block.eval()
    _perturb_affines(block, 7)
    if layer_scale:
        with torch.no_grad():
            block.ls_1.gamma.uniform_(0.5, 1.5)
    head = 2
    dh = width // heads
    with torch.no_grad():  # silence the other heads in the real module
        mask = torch.zeros(width)
        mask[head * dh : (head + 1) * dh] = 1
        block.attn.out_proj.weight.mul_(mask[None, :])
    x = torch.randn(3, tokens, width) * 2 + 0.7
    with torch.no_grad():
        out, weights = block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=True,
                                  average_attn_weights=False)
        stock = block.ls_1(out - block.attn.out_proj.bias)
        stock = stock - stock.mean(dim=-1, keepdim=True)
        w_v, w_o = vo_factors(block, heads)
        c = head_value_bias(block, heads)
        x_hat = torch.nn.functional.layer_norm(x, (width,), eps=block.ln_1.eps)
        folded = weights[:, head] @ (x_hat @ w_v[head] + c[head]) @ w_o[head]
    torch.testing.assert_close(folded, stock, atol=1e-5, rtol=1e-5)


def test_decompose_defaults_to_last_four_layers():
    loaded = load_model("ViT-B-32")
    result = decompose(loaded)
    assert sorted(result) == [8, 9, 10, 11]
    assert decompose(loaded, [-1]).keys() == {11}
    assert result[11].V.shape == (12, 768, 64)


INFO = VisionInfo(layers=12, heads=8, width=512, head_dim=64, output_dim=256)


def test_resolve_layers_and_heads():
    assert resolve_layers(INFO, None) == [8, 9, 10, 11]
    assert resolve_layers(INFO, [-1, 0, 11, 3]) == [0, 3, 11]
    assert resolve_layers(INFO, 5) == [5]
    assert resolve_layers(VisionInfo(2, 4, 64, 16, 32), None) == [0, 1]
    assert resolve_heads(INFO, None) == list(range(8))
    assert resolve_heads(INFO, [-1, 2]) == [2, 7]


@pytest.mark.parametrize(
    ("func", "value", "field"),
    [
        (resolve_layers, [12], "layers"),
        (resolve_layers, [-13], "layers"),
        (resolve_layers, [], "layers"),
        (resolve_layers, ["3"], "layers"),
        (resolve_layers, [True], "layers"),
        (resolve_heads, [8], "heads"),
        (resolve_heads, [1.0], "heads"),
    ],
)
def test_out_of_range_indices_are_invalid_input(func, value, field):
    with pytest.raises(InvalidInput) as err:
        func(INFO, value)
    assert err.value.field == field
