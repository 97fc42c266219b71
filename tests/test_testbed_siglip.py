"""testbed-siglip, the testbed's second tower family (SigLIP-style timm ViT with a MAP head):
it resolves by name like every shipped testbed model, loads through plain open_clip once sith's
towers are registered, decomposes, and has ground-truth head labels through its attention pool."""

from __future__ import annotations

import open_clip
import pytest
import torch

from sith.engine.decomposition import decompose
from sith.engine.errors import InvalidInput
from sith.engine.models import load_reference
from sith.testbed.checkpoint import CHECKPOINT_DIR, load_checkpoint
from sith.testbed.train import build_model, init_positions, load_preset, sincos_2d

NAME = "testbed-siglip"
FOLDER = CHECKPOINT_DIR / NAME


@pytest.fixture(scope="module")
def siglip():
    return load_reference(NAME)


def test_loads_by_name_and_decomposes(siglip):
    from sith.engine.towers import adapter_for
    from sith.testbed.vocabulary import is_testbed

    assert siglip.name == NAME and adapter_for(siglip).family == "timm-vit-map"
    assert (siglip.info.layers, siglip.info.heads, siglip.info.width) == (5, 4, 96)
    svd = decompose(siglip, [4])[4]
    assert svd.S.shape[0] == 4 and bool((svd.S[:, :-1] >= svd.S[:, 1:]).all())
    assert is_testbed(siglip)  # its own text tower: the world vocabulary applies


def test_plain_open_clip_loads_it_once_sith_registers_the_tower(siglip):
    import sith.engine.towers  # noqa: F401  (the registration plain open_clip needs)

    model = open_clip.create_model(f"local-dir:{FOLDER}").eval()
    again, _ = load_checkpoint(FOLDER)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = siglip.model.encode_image(x)
        assert torch.allclose(model.encode_image(x), ref, atol=1e-5)
        assert torch.allclose(again.encode_image(x), ref, atol=1e-5)


def test_pooled_head_writes_sum_to_the_pooled_attention_output(siglip):
    """Σ_heads (pooled write) + bias = the attention output averaged with the MAP pool's attention."""
    from sith.adaptation.universality import _pool_hook, ground_truth_eta2, head_cls_writes, head_pooled_writes
    from sith.testbed.evaluate import factor_set

    x = factor_set(12).images
    trunk = siglip.model.visual.trunk
    block = trunk.blocks[2]
    seen, weights = [], []
    handles = [block.attn.proj.register_forward_hook(lambda module, args, out: seen.append(out)),
               trunk.attn_pool.register_forward_pre_hook(_pool_hook(weights))]
    with torch.no_grad():
        siglip.model.encode_image(x)
    for handle in handles:
        handle.remove()
    writes = head_pooled_writes(siglip, x)
    assert sorted(writes) == list(range(5)) and writes[2].shape == (4, 12, 96)
    assert torch.allclose(weights[0].sum(1), torch.ones(12), atol=1e-5)
    expected = torch.einsum("btd,bt->bd", seen[0], weights[0])
    assert torch.allclose(writes[2].sum(0) + block.attn.proj.bias, expected, atol=1e-5)
    truth = ground_truth_eta2(siglip, n_images=40, layers=[4])
    assert truth.eta2.shape == (4, 7) and set(truth.labels()) <= set(truth.factors)
    with pytest.raises(InvalidInput):
        head_cls_writes(siglip, x)  # no class token: the class-token reader still names the tower


def test_untrained_vision_control_reinitialises_a_timm_tower(siglip):
    from sith.adaptation.universality import untrained_vision_control

    control = untrained_vision_control(siglip, seed=0)
    trained = dict(siglip.model.visual.named_parameters())
    fresh = dict(control.model.visual.named_parameters())
    assert all(not torch.equal(trained[k], fresh[k]) for k in ("trunk.pos_embed", "trunk.attn_pool.latent"))
    assert control.hash != siglip.hash and control.hash == untrained_vision_control(siglip, seed=0).hash


def test_preset_starts_positions_at_sincos():
    preset = load_preset("siglip")
    assert preset.name == NAME and preset.train.position_init == "sincos2d"
    code = sincos_2d((8, 8), 96)
    assert code.shape == (64, 96) and torch.allclose(code.norm(dim=1), torch.full((64,), 48 ** 0.5))
    assert len({tuple(row.tolist()) for row in code}) == 64  # every position distinct
    model = build_model(preset.model_cfg)
    init_positions(model, "sincos2d")
    assert torch.equal(model.visual.trunk.pos_embed[0], code)
    with pytest.raises(InvalidInput):
        init_positions(model, "rope")
    clip = build_model(load_preset("small").model_cfg)
    with pytest.raises(InvalidInput):
        init_positions(clip, "sincos2d")  # an open_clip ViT has no timm pos_embed
