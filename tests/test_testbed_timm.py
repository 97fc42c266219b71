"""testbed-timm, the testbed's timm class-token ViT (a second tower implementation beside open_clip's):
it resolves by name like every shipped testbed model, loads through plain open_clip once sith's towers
are registered, decomposes, and has ground-truth head labels through its class token."""

from __future__ import annotations

import open_clip
import pytest
import torch

from sith.engine.decomposition import decompose
from sith.engine.errors import InvalidInput
from sith.engine.models import load_reference
from sith.testbed.checkpoint import CHECKPOINT_DIR, load_checkpoint
from sith.testbed.train import build_model, init_tower, load_preset

NAME = "testbed-timm"
FOLDER = CHECKPOINT_DIR / NAME


@pytest.fixture(scope="module")
def timm_model():
    return load_reference(NAME)


def test_loads_by_name_decomposes_and_reads_the_class_token(timm_model):
    from sith.adaptation.universality import ground_truth_eta2, head_cls_writes
    from sith.engine.towers import adapter_for
    from sith.testbed.evaluate import factor_set
    from sith.testbed.vocabulary import TESTBED_MODELS, is_testbed

    assert NAME in TESTBED_MODELS
    assert timm_model.name == NAME and adapter_for(timm_model).family == "timm-vit"
    assert (timm_model.info.layers, timm_model.info.heads, timm_model.info.width) == (5, 4, 96)
    svd = decompose(timm_model, [4])[4]
    assert svd.S.shape[0] == 4 and bool((svd.S[:, :-1] >= svd.S[:, 1:]).all())
    assert is_testbed(timm_model)  # its own text tower: the world vocabulary applies

    # Σ_heads (class-token write) + the attention-output bias = the block's attention output at token 0
    x = factor_set(12).images
    block = timm_model.model.visual.trunk.blocks[2]
    seen = []
    handle = block.attn.proj.register_forward_hook(lambda module, args, out: seen.append(out[:, 0]))
    with torch.no_grad():
        timm_model.model.encode_image(x)
    handle.remove()
    writes = head_cls_writes(timm_model, x)
    assert sorted(writes) == list(range(5)) and writes[2].shape == (4, 12, 96)
    assert torch.allclose(writes[2].sum(0) + block.attn.proj.bias, seen[0], atol=1e-5)
    truth = ground_truth_eta2(timm_model, n_images=40, layers=[4])
    assert truth.eta2.shape == (4, 7) and set(truth.labels()) <= set(truth.factors)


def test_plain_open_clip_loads_it_once_sith_registers_the_tower(timm_model):
    import sith.engine.towers  # noqa: F401  (the registration plain open_clip needs)

    model = open_clip.create_model(f"local-dir:{FOLDER}").eval()
    again, _ = load_checkpoint(FOLDER)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = timm_model.model.encode_image(x)
        assert torch.allclose(model.encode_image(x), ref, atol=1e-5)
        assert torch.allclose(again.encode_image(x), ref, atol=1e-5)


def test_preset_starts_the_tower_at_open_clip_init():
    preset = load_preset("timm")
    assert preset.name == NAME and preset.train.tower_init == "open_clip"
    torch.manual_seed(0)
    model = build_model(preset.model_cfg)
    trunk = model.visual.trunk
    assert trunk.pos_embed.std() < 0.03 and trunk.blocks[0].mlp.fc1.weight.std() < 0.03  # timm's N(0, 0.02²)
    init_tower(model, "open_clip")
    scale = 96 ** -0.5
    assert abs(trunk.pos_embed.std().item() - scale) < 0.01 and abs(trunk.cls_token.std().item() - scale) < 0.03
    assert trunk.blocks[0].mlp.fc1.weight.std() > 0.04  # PyTorch's default, std 1/sqrt(3·96) ≈ 0.059
    assert torch.count_nonzero(trunk.blocks[0].attn.qkv.bias) == 0
    assert torch.count_nonzero(trunk.blocks[0].attn.proj.bias) == 0
    with pytest.raises(InvalidInput):
        init_tower(model, "jax")
    with pytest.raises(InvalidInput):
        init_tower(build_model(load_preset("small").model_cfg), "open_clip")  # an open_clip ViT: nothing to redo


def test_lora_finetune_and_delta_by_name(tmp_path):
    """`sith adapt finetune testbed-timm --mode lora` (LoRA on the fused qkv and proj, found through the
    tower adapter), then `sith adapt delta` on the pair: the whole adaptation loop on a timm tower."""
    import json

    from click.testing import CliRunner

    from sith.cli import main

    out = tmp_path / "ft"
    result = CliRunner().invoke(main, ["adapt", "finetune", "testbed-timm", str(out), "--mode", "lora", "--steps", "2",
                                       "--batch-size", "8", "--subtask", "swap-red-blue"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["trainable_parameters"] == 5 * 4 * ((96 + 3 * 96) + (96 + 96))  # rank 4, qkv + proj
    delta = CliRunner().invoke(main, ["adapt", "delta", "testbed-timm", str(out), "--json"])
    assert delta.exit_code == 0, delta.output
    report = json.loads(delta.stdout)
    assert report["heads"] and all(row["relative"] > 0 for row in report["heads"])
