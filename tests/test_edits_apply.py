"""Writing α-scaled singular values back into the stock open_clip layout."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from edits_fixtures import TINY_CFG, images, tiny_clip
from sith.edits.apply import apply_multipliers, revert
from sith.edits.export import export_checkpoint, export_folder, read_manifest
from sith.edits.multipliers import Multipliers
from sith.engine.decomposition import decompose_layer
from sith.engine.errors import InvalidInput


def _decompose(model, layers):
    blocks = model.visual.transformer.resblocks
    heads = blocks[0].attn.num_heads
    return {layer: decompose_layer(blocks[layer], heads, layer) for layer in layers}


def _embed(model, x):
    with torch.no_grad():
        return model.encode_image(x)


def test_alpha_one_reproduces_embeddings_when_every_head_is_rewritten():
    model = tiny_clip()
    decomposition = _decompose(model, [0, 1, 2])
    ones = Multipliers({layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()})
    edited = apply_multipliers(model, ones, decomposition, skip_unchanged=False)
    x = images()
    assert (_embed(edited, x) - _embed(model, x)).abs().max() < 1e-5
    # the write-back path really ran: out_proj changed by float noise only, in_proj untouched
    for b_old, b_new in zip(model.visual.transformer.resblocks, edited.visual.transformer.resblocks):
        assert torch.equal(b_old.attn.in_proj_weight, b_new.attn.in_proj_weight)
        assert torch.equal(b_old.ln_1.weight, b_new.ln_1.weight)
        assert torch.allclose(b_old.attn.out_proj.weight, b_new.attn.out_proj.weight, atol=1e-5)


def test_suppressing_one_vector_zeroes_exactly_that_singular_value():
    model = tiny_clip()
    decomposition = _decompose(model, [1, 2])
    alpha = {layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()}
    alpha[2][3, 5] = 0.0
    alpha[1][0, 0] = 2.0
    edited = apply_multipliers(model, Multipliers(alpha), decomposition)
    after = _decompose(edited, [1, 2])
    before_s = decomposition[2].S[3]
    after_s = after[2].S[3]  # re-sorted: the zeroed value drops to the end
    expected = torch.cat([before_s[:5], before_s[6:], before_s.new_zeros(1)])
    assert torch.allclose(after_s, expected, atol=1e-4 * float(before_s[0]))
    assert float(after_s[-1]) < 1e-4 * float(before_s[0])
    # amplified head: top value doubled, the others unchanged
    s1 = decomposition[1].S[0]
    assert torch.allclose(after[1].S[0], torch.sort(torch.cat([2 * s1[:1], s1[1:]]), descending=True).values,
                          rtol=1e-4)
    # untouched heads are bit-identical
    for h in (0, 1, 2):
        cols = slice(16 * h, 16 * (h + 1))
        assert torch.equal(edited.visual.transformer.resblocks[2].attn.out_proj.weight[:, cols],
                           model.visual.transformer.resblocks[2].attn.out_proj.weight[:, cols])
    # the edit changed what the model computes
    x = images()
    assert (_embed(edited, x) - _embed(model, x)).abs().max() > 1e-3


def test_revert_and_compose_are_exact_against_the_base_decomposition():
    model = tiny_clip()
    decomposition = _decompose(model, [2])
    a = Multipliers({2: torch.ones(4, 16)})
    a.values[2][0, :3] = 0.5
    b = Multipliers({2: torch.ones(4, 16)})
    b.values[2][0, 1] = 3.0
    b.values[2][2, 4] = -1.0
    x = images()
    both = apply_multipliers(model, a.compose(b), decomposition)
    assert torch.allclose(a.compose(b).values[2], a.values[2] * b.values[2])
    # removing `a` from the composed edit (divide where α≠0) leaves exactly `b`
    only_b = apply_multipliers(both, a.compose(b).compose(a.inverse()), decomposition)
    direct_b = apply_multipliers(model, b, decomposition)
    assert (_embed(only_b, x) - _embed(direct_b, x)).abs().max() < 1e-5
    assert (_embed(revert(both, decomposition), x) - _embed(model, x)).abs().max() < 1e-5


def test_inverse_refuses_zero_multipliers():
    m = Multipliers({0: torch.tensor([[1.0, 0.0]])})
    with pytest.raises(InvalidInput, match="α = 0"):
        m.inverse()


def test_decomposition_of_another_model_is_rejected():
    model, other = tiny_clip(0), tiny_clip(5)
    decomposition = _decompose(other, [2])
    alpha = torch.ones(4, 16)
    alpha[0, 0] = 0
    with pytest.raises(InvalidInput, match="decomposition"):
        apply_multipliers(model, Multipliers({2: alpha}), decomposition)


def test_exported_checkpoint_loads_in_plain_open_clip_with_identical_embeddings(tmp_path):
    model = tiny_clip()
    decomposition = _decompose(model, [1, 2])
    alpha = {layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()}
    alpha[2][1, :4] = 0.0
    alpha[1][3, 2] = -1.0
    edited = apply_multipliers(model, Multipliers(alpha), decomposition)
    path = tmp_path / "edited.safetensors"
    export_checkpoint(edited, path, {"base_hash": "abc", "spec": {"operations": []}})

    plain = open_clip.model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    plain.load_state_dict(load_file(str(path)))  # strict: no extra or missing tensors
    x = images()
    assert (_embed(plain, x) - _embed(edited, x)).abs().max() < 1e-6
    manifest = read_manifest(path)
    assert manifest["base_hash"] == "abc" and manifest["version"] == 1

    folder = export_folder(edited, tmp_path / "edited-dir", {"base_hash": "abc"}, TINY_CFG)
    via_local_dir = open_clip.create_model(f"local-dir:{folder}").eval()
    assert (_embed(via_local_dir, x) - _embed(edited, x)).abs().max() < 1e-6
    assert read_manifest(folder)["base_hash"] == "abc"


@pytest.mark.slow
def test_vit_b32_identity_and_export_equivalence(tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    decomposition = _decompose(model, [10, 11])
    ones = Multipliers({layer: torch.ones_like(svd.S) for layer, svd in decomposition.items()})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    base = _embed(model, x)
    assert (_embed(apply_multipliers(model, ones, decomposition, skip_unchanged=False), x) - base).abs().max() < 1e-5
    alpha = copy.deepcopy(ones)
    alpha.values[11][4, :10] = 0.0
    edited = apply_multipliers(model, alpha, decomposition)
    path = tmp_path / "b32.safetensors"
    export_checkpoint(edited, path, {"base_hash": "x"})
    plain = open_clip.create_model("ViT-B-32").eval()
    plain.load_state_dict(load_file(str(path)))
    assert (_embed(plain, x) - _embed(edited, x)).abs().max() < 1e-6
    assert (_embed(edited, x) - base).abs().max() > 1e-4


def test_layer_scale_towers_are_written_back_exactly():
    cfg = copy.deepcopy(TINY_CFG)
    cfg["vision_cfg"]["ls_init_value"] = 0.5
    torch.manual_seed(3)
    model = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.ls_1.gamma.copy_(0.2 + torch.rand_like(block.ls_1.gamma))
            block.attn.out_proj.bias.normal_(0, 0.2)
            block.attn.in_proj_bias.normal_(0, 0.2)
    decomposition = _decompose(model, [2])
    ones = Multipliers({2: torch.ones_like(decomposition[2].S)})
    x = images()
    assert (_embed(apply_multipliers(model, ones, decomposition, skip_unchanged=False), x) - _embed(model, x)).abs().max() < 1e-5
    alpha = torch.ones_like(decomposition[2].S)
    alpha[1, 0] = 0.0
    after = _decompose(apply_multipliers(model, Multipliers({2: alpha}), decomposition), [2])
    s = decomposition[2].S[1]
    assert torch.allclose(after[2].S[1][:-1], s[1:], rtol=1e-4) and float(after[2].S[1][-1]) < 1e-4 * float(s[0])
