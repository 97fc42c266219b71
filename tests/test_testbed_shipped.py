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
