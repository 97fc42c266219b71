"""Export an edited model as a stock open_clip safetensors checkpoint with a SITH manifest.

The weights file is exactly what ``open_clip.create_model(...)`` + ``load_state_dict`` expects (no
extra tensors), so the checkpoint is usable without SITH. The manifest (base model hash, spec,
affected vectors with explanations, format version) rides in the safetensors ``__metadata__``
under one key as JSON; the multipliers are stored next to it (``*.edit.safetensors``) so the edit
can be re-applied to the base, composed with another, or reverted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from sith.engine.errors import InvalidInput

MANIFEST_KEY = "sith.manifest"
MANIFEST_FORMAT = "sith-edited-checkpoint"
MANIFEST_VERSION = 1
FOLDER_CONFIG = "open_clip_config.json"
FOLDER_WEIGHTS = "open_clip_model.safetensors"


def _clip(model):
    return getattr(model, "model", model)


def export_checkpoint(model, path: str | Path, manifest: dict[str, Any]) -> None:
    """Write the full CLIP state dict (vision + text) to ``path`` with ``manifest`` in its metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidInput("output", f"edited checkpoints are written as .safetensors, got {path.name!r}")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in _clip(model).state_dict().items()}
    full = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest}
    try:
        text = json.dumps(full, sort_keys=True)
    except TypeError as exc:
        raise InvalidInput("manifest", f"not JSON-serialisable: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={MANIFEST_KEY: text})


def export_folder(model, folder: str | Path, manifest: dict[str, Any], model_cfg: dict[str, Any],
                  preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """open_clip's hf-hub layout, loadable with ``open_clip.create_model('local-dir:<folder>')``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / FOLDER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    export_checkpoint(model, folder / FOLDER_WEIGHTS, manifest)
    return folder


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The SITH manifest of an exported checkpoint (file, or hf-hub style folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDER_WEIGHTS
    if not path.is_file():
        raise InvalidInput("checkpoint", f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # not a safetensors file
        raise InvalidInput("checkpoint", f"not a safetensors file: {exc}") from exc
    if MANIFEST_KEY not in metadata:
        raise InvalidInput("checkpoint", f"{path.name} has no SITH manifest (not exported by `sith edit apply`)")
    return json.loads(metadata[MANIFEST_KEY])
