"""The shipped second-family testbed checkpoints: complete folders, within the size budget, naming
the sith-registered timm tower they were trained with."""

from __future__ import annotations

import json

import pytest

from sith.testbed.checkpoint import CHECKPOINT_DIR, CONFIG_NAME, MAX_BYTES, WEIGHTS_NAME


@pytest.mark.parametrize(("name", "timm_model"), [("testbed-siglip", "sith_testbed_vit_map"),
                                                  ("testbed-timm", "sith_testbed_vit")])
def test_shipped_folder_is_complete_and_small(name: str, timm_model: str) -> None:
    folder = CHECKPOINT_DIR / name
    names = {p.name for p in folder.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME, "train.json", "eval.json", "preset.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_BYTES
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == timm_model


def test_shipped_transformers_clip_loads_by_name_and_with_from_pretrained() -> None:
    """testbed-hf-clip: a transformers CLIPModel folder (issue 13's "HF CLIP config" second family),
    complete and within budget; it resolves by name, speaks the world's words, and transformers'
    own loader reads the same weights."""
    import torch
    import transformers

    from sith.engine.models import load_reference
    from sith.engine.towers.hf import HFModel
    from sith.testbed.train import load_preset
    from sith.testbed.vocabulary import is_testbed

    folder = CHECKPOINT_DIR / "testbed-hf-clip"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "train.json", "eval.json", "preset.json"} <= names
    assert CONFIG_NAME not in names and sum(p.stat().st_size for p in folder.iterdir()) <= MAX_BYTES
    loaded = load_reference("testbed-hf-clip")
    assert isinstance(loaded.model, HFModel) and loaded.info.layers == 5 and loaded.info.heads == 4
    assert is_testbed(loaded)
    stock = transformers.CLIPModel.from_pretrained(str(folder))
    assert all(torch.equal(loaded.model.hf.state_dict()[k], v) for k, v in stock.state_dict().items())
    assert json.loads((folder / "preset.json").read_text())["model_cfg"] == load_preset("hf-clip").model_cfg
    assert json.loads((folder / "eval.json").read_text())["zero_shot"]["colour"]["accuracy"] >= 0.9


def test_lora_finetune_of_the_transformers_testbed_model_by_name(tmp_path) -> None:
    """`sith adapt finetune testbed-hf-clip --mode lora` (LoRA on q/k/v and out_proj through the tower
    adapter), written back in transformers' format, then `sith adapt delta` on the pair."""
    from click.testing import CliRunner

    from sith.cli import main

    out = tmp_path / "ft"
    result = CliRunner().invoke(main, ["adapt", "finetune", "testbed-hf-clip", str(out), "--mode", "lora",
                                       "--steps", "2", "--batch-size", "8", "--subtask", "swap-red-blue"])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "finetune.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["trainable_parameters"] == 5 * 4 * (3 * (96 + 96) + (96 + 96))  # rank 4: q, k, v + out_proj
    delta = CliRunner().invoke(main, ["adapt", "delta", "testbed-hf-clip", str(out), "--json"])
    assert delta.exit_code == 0, delta.output
    assert all(row["relative"] > 0 for row in json.loads(delta.stdout)["heads"])
