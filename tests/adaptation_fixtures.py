"""Tiny random CLIPs and planted fine-tuning changes for the adaptation tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from edits_fixtures import TINY_CFG, tiny_clip
from sith.engine.models import LoadedModel, load_model


def save_and_load(model, cfg: dict, folder: Path, name: str) -> LoadedModel:
    """Write ``model`` as config + safetensors and load it back through the engine (real hashes)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(cfg))
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return load_model(config=config, checkpoint=weights)


def checkpoint_folder(path: Path, model, cfg: dict | None = None) -> str:
    """``model`` saved as an open_clip folder (config + safetensors), as the CLI takes it."""
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg or TINY_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return str(path)


def plant_rank_one(model, layer: int, head: int, write: torch.Tensor, scale: float = 1.0, seed: int = 3):
    """A copy whose head (layer, head) additionally writes ``write`` (a residual direction):
    W_O^h += c ⊗ write, so ΔW_VO = (A_h c) ⊗ write has rank one and right vector ∝ centred write."""
    out = copy.deepcopy(model)
    attn = out.visual.transformer.resblocks[layer].attn
    dh = attn.head_dim
    c = torch.randn(dh, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        attn.out_proj.weight[:, head * dh:(head + 1) * dh] += scale * torch.outer(write, c)
    return out


__all__ = ["TINY_CFG", "tiny_clip", "save_and_load", "plant_rank_one", "checkpoint_folder"]
