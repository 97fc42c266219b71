"""Saving testbed models in open_clip's hf-hub folder layout.

``<folder>/open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}) plus
``<folder>/open_clip_model.safetensors`` is what ``open_clip.create_model("local-dir:<folder>")``
and ``sith.engine.models.load_model(config=<folder>)`` read, so the checkpoints need no sith code,
except testbed-siglip and testbed-timm: their timm towers (``sith_testbed_vit_map``,
``sith_testbed_vit``) exist once ``sith.engine.towers`` has been imported, which every sith loading
path does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from sith.testbed.world import MEAN, STD

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
MAX_BYTES = 30 * 1024 * 1024
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def preprocess_cfg(image_size: int) -> dict[str, Any]:
    return {"size": image_size, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def save_checkpoint(model: open_clip.model.CLIP, model_cfg: dict[str, Any], folder: Path) -> torch.dtype:
    """Write the folder; fp32 when the weights fit in MAX_BYTES, else fp16. Returns the dtype used.

    A transformers model (``model_cfg["hf"]``) is written in transformers' own format instead
    (config.json + model.safetensors: ``from_pretrained`` and every sith command load it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if "hf" in model_cfg:
        model.sith_export(folder, {})
        return torch.float32
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    n_bytes = sum(v.numel() * 4 for v in state.values())
    dtype = torch.float32 if n_bytes <= MAX_BYTES else torch.float16
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    (folder / WEIGHTS_NAME).chmod(0o644)  # safetensors writes 0600; checkpoints ship as package data
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg["vision_cfg"]["image_size"])}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dtype


def load_checkpoint(folder: Path, device: str = "cpu") -> tuple[open_clip.model.CLIP, Any]:
    """(model in eval mode, tokenizer) through plain open_clip.

    testbed-siglip's and testbed-timm's configs name timm towers that sith registers
    (``sith_testbed_vit_map``, ``sith_testbed_vit``), so the registration is imported first; plain
    open_clip needs ``import sith.engine.towers`` too.
    """
    import sith.engine.towers  # noqa: F401  (registers the testbed's timm towers)

    model = open_clip.create_model(f"local-dir:{folder}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model.eval(), tokenizer
