"""Model loading: every source, the vision hash, QuickGELU rule and input errors."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from sith.engine import models
from sith.engine.errors import InvalidInput
from sith.engine.models import load_model, uses_quick_gelu, vision_hash

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_model() -> open_clip.CLIP:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CFG)
    with torch.no_grad():  # distinguishable from a fresh init
        model.visual.ln_post.bias.normal_()
    return model


def write_folder(folder, model, cfg=TINY_CFG):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    )
    save_file(_state(model), str(folder / "open_clip_model.safetensors"))
    return folder


def test_builtin_name_random_init_is_vit_in_eval_fp32():
    loaded = load_model("ViT-B-32")
    assert loaded.name == "ViT-B-32"
    assert loaded.info == models.VisionInfo(layers=12, heads=12, width=768, head_dim=64, output_dim=512)
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.tokenizer(["a cat"]).shape == (1, 77)
    assert loaded.preprocess is not None
    assert len(loaded.hash) == 64


def test_hash_is_content_addressed(tiny_model, tmp_path):
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(TINY_CFG))
    save_file(_state(tiny_model), str(tmp_path / "w.safetensors"))
    torch.save(_state(tiny_model), tmp_path / "w.pt")
    a = load_model(config=cfg_path, checkpoint=tmp_path / "w.safetensors")
    b = load_model(config=cfg_path, checkpoint=tmp_path / "w.pt")
    assert a.hash == b.hash == vision_hash(tiny_model)
    assert a.name == "w"
    torch.testing.assert_close(a.model.visual.proj, tiny_model.visual.proj)
    with torch.no_grad():
        b.model.visual.transformer.resblocks[1].attn.out_proj.weight[0, 0] += 1e-3
    assert vision_hash(b.model) != a.hash
    # the text tower is not part of the vision hash
    with torch.no_grad():
        a.model.token_embedding.weight.add_(1.0)
    assert vision_hash(a.model) == vision_hash(tiny_model)


def test_folder_layout_and_default_model_path(tiny_model, tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "testbed-main", tiny_model)
    by_config = load_model(config=folder)
    by_name = load_model(str(folder))
    assert by_config.hash == by_name.hash == vision_hash(tiny_model)
    assert by_config.name == "testbed-main"
    assert by_config.info.heads == 4 and by_config.info.head_dim == 16
    assert tuple(by_config.model.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    tokens = by_config.tokenizer(["hello world"])
    torch.testing.assert_close(by_config.model.encode_text(tokens), tiny_model.eval().encode_text(tokens))

    monkeypatch.setattr(models, "TESTBED_DIR", folder)
    assert models.default_model().hash == vision_hash(tiny_model)
    assert load_model().hash == vision_hash(tiny_model)

    monkeypatch.setattr(models, "TESTBED_DIR", tmp_path / "missing")
    with pytest.raises(InvalidInput) as err:
        models.default_model()
    assert err.value.field == "model" and "not installed" in err.value.reason


def test_quick_gelu_rule():
    assert uses_quick_gelu("ViT-B-32", "openai")
    assert uses_quick_gelu("ViT-B-32-quickgelu", None)
    assert not uses_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    acts = {type(m).__name__ for m in load_model("ViT-B-32-quickgelu").model.visual.modules()}
    assert "QuickGELU" in acts
    plain = {type(m).__name__ for m in load_model("ViT-B-32").model.visual.modules()}
    assert "QuickGELU" not in plain


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"name": "ViT-B-33"}, "name", "unknown open_clip model"),
        ({"name": "RN50"}, "name", "not a ViT"),
        ({"name": "ViT-B-32", "pretrained": "opnai"}, "pretrained", "unknown tag"),
        ({"name": "ViT-B-32", "checkpoint": "weights.ckpt"}, "checkpoint", "unsupported extension"),
        ({"name": "ViT-B-32", "checkpoint": "missing.safetensors"}, "checkpoint", "not found"),
        ({"config": "missing.json"}, "config", "not found"),
    ],
)
def test_bad_input_names_the_field(kwargs, field, fragment):
    with pytest.raises(InvalidInput) as err:
        load_model(**kwargs)
    assert err.value.field == field
    assert fragment in err.value.reason


def test_suggestions_for_close_names():
    with pytest.raises(InvalidInput) as err:
        load_model("ViT-B-33")
    assert "ViT-B-32" in err.value.suggestions
    with pytest.raises(InvalidInput) as err:
        load_model("ViT-B-32", pretrained="opnai")
    assert "openai" in err.value.suggestions


def test_bad_configs_and_weights(tmp_path, tiny_model):
    rn = tmp_path / "rn.json"
    rn.write_text(json.dumps(open_clip.get_model_config("RN50")))
    with pytest.raises(InvalidInput, match="not a ViT") as err:
        load_model(config=rn)
    assert err.value.field == "config"
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"hello": 1}))
    with pytest.raises(InvalidInput, match="not an open_clip model config"):
        load_model(config=junk)
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(InvalidInput, match="open_clip_config.json"):
        load_model(config=folder)
    # weights of another architecture
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(TINY_CFG))
    other = open_clip.model.CLIP(**{**TINY_CFG, "embed_dim": 16})
    save_file(_state(other), str(tmp_path / "other.safetensors"))
    with pytest.raises(InvalidInput, match="could not load weights") as err:
        load_model(config=cfg_path, checkpoint=tmp_path / "other.safetensors")
    assert err.value.field == "checkpoint"


HUB_SCRIPT = """
import sys
from sith.engine.errors import InvalidInput
from sith.engine.models import load_model
loaded = load_model("hf-hub:sith-test/tiny")
print(loaded.name, loaded.hash, loaded.info.layers)
for bad in ("hf-hub:sith-test/not-cached", "hf-hub:no repo"):
    try:
        load_model(bad)
    except InvalidInput as exc:
        print(exc.field, "|", exc.reason.split(":")[0])
"""


def test_hf_hub_names_load_through_the_hub_cache(tiny_model, tmp_path):
    """hf-hub:ORG/REPO goes through huggingface_hub: here its real offline cache, filled as the Hub
    client lays it out (refs/main -> snapshots/<rev>/ with the open_clip folder files)."""
    import os
    import subprocess
    import sys

    folder = write_folder(tmp_path / "src", tiny_model)
    repo = tmp_path / "hub" / "models--sith-test--tiny"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    run = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first, *errors = run.stdout.splitlines()
    assert first.split() == ["hf-hub:sith-test/tiny", load_model(config=folder).hash, "2"]
    assert errors == ["name | could not fetch hf-hub", "name | expected hf-hub"]


def test_one_string_names_a_model_everywhere(tiny_model, tmp_path):
    from sith.engine.models import TESTBED_DIR, load_reference

    folder = write_folder(tmp_path / "tiny", tiny_model)
    assert load_reference(str(folder)).hash == load_model(config=folder).hash  # folder: config + weights
    assert load_reference(str(folder / "open_clip_config.json")).info.layers == 2  # config alone: architecture
    if (TESTBED_DIR / "open_clip_model.safetensors").is_file():
        assert load_reference("").name == load_reference("default").name == "testbed-main"
        assert load_reference("testbed-small").info.layers == 5
    with pytest.raises(InvalidInput) as err:
        load_reference("ViT-B-32/not-a-tag")
    assert err.value.field == "pretrained"
    with pytest.raises(InvalidInput) as err:
        load_reference("ViT-B-3")
    assert err.value.field == "name" and "ViT-B-32" in err.value.suggestions


HF_HUB_SCRIPT = """
from sith.engine.models import load_model
loaded = load_model("hf-hub:sith-test/tiny-hf-clip")
print(loaded.name, loaded.hash, loaded.info.layers, type(loaded.model).__name__)
"""


def test_transformers_repos_load_through_the_hub_cache(tmp_path):
    """hf-hub: also serves transformers repos (config.json + model.safetensors) from the offline cache."""
    import os
    import subprocess
    import sys

    import transformers

    from sith.engine.towers.hf import HFModel

    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8}, projection_dim=16)
    source = HFModel(transformers.CLIPModel(config).eval()).sith_export(tmp_path / "src", {})
    revision = "1" * 40
    repo = tmp_path / "hub" / "models--sith-test--tiny-hf-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    run = subprocess.run([sys.executable, "-c", HF_HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    name, digest, layers, kind = run.stdout.splitlines()[-1].split()
    assert (name, digest, layers, kind) == ("hf-hub:sith-test/tiny-hf-clip", load_model(str(source)).hash, "3", "HFModel")


def test_named_configs_of_other_families_load_and_unsupported_ones_are_named():
    """An open_clip built-in name of another family (PE-Core, timm MAP head) loads with random weights;
    a ConvNeXt name is refused with the tower type, from the meta-device check (no allocation)."""
    loaded = load_model("PE-Core-T-16-384")
    assert loaded.info.heads == 3 and loaded.info.output_dim == 512
    assert loaded.tokenizer._tokenizer is None  # built on first text use
    with pytest.raises(InvalidInput) as err:
        load_model("convnext_xxlarge")
    assert err.value.field == "name" and "timm ConvNeXt" in err.value.reason
