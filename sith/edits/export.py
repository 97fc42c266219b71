"""Export an edited model as a complete open_clip model: weights, architecture and the SITH manifest.

Two forms, one function (``export_model``), chosen by the output name:

* a **folder** (any name not ending in ``.safetensors``), open_clip's hf-hub layout:
  ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}) + ``open_clip_model.safetensors``
  (+ ``sith_manifest.json``, the same manifest as readable JSON). Plain
  ``open_clip.create_model("local-dir:<folder>")`` loads it with no SITH code, and so does every
  ``sith`` command (``--model <folder>``);
* a **single file** ``X.safetensors`` that carries its own config: the same open_clip config JSON
  rides in the safetensors metadata under ``open_clip_config`` next to the manifest
  (``sith.manifest``). Every ``sith`` command accepts the file as a model (``--model X.safetensors``
  or ``--checkpoint X.safetensors`` alone); ``unpack_checkpoint`` (plain Python, no torch) turns it
  into the folder form for plain open_clip. This is the one-file form the server's download uses.

The weights are exactly what ``open_clip.create_model(...)`` + ``load_state_dict`` expects (no
extra tensors). The manifest (base model hash, spec, affected vectors with explanations, format
version) lets the edit be inspected, re-applied, composed or reverted.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

from sith.engine.errors import InvalidInput

MANIFEST_KEY = "sith.manifest"
CONFIG_KEY = "open_clip_config"  # = sith.engine.models.EMBEDDED_CONFIG_KEY
MANIFEST_FORMAT = "sith-edited-checkpoint"
MANIFEST_VERSION = 1
FOLDER_CONFIG = "open_clip_config.json"
FOLDER_WEIGHTS = "open_clip_model.safetensors"
FOLDER_MANIFEST = "sith_manifest.json"
FOLDER_MULTIPLIERS = "sith_multipliers.edit.safetensors"
# Exported files are meant to be shared, like the config beside them (safetensors writes 0600).
FILE_MODE = 0o644


def _clip(model):
    return getattr(model, "model", model)


def is_single_file(out: str | Path) -> bool:
    """Whether ``export_model`` writes ``out`` as one self-describing file (else as a folder)."""
    return str(out).lower().endswith(".safetensors")


def multipliers_path(out: str | Path) -> Path:
    """Where the CLI keeps an export's multipliers: ``X.edit.safetensors`` beside a file, inside a folder."""
    out = Path(out)
    if is_single_file(out):
        return out.with_name(out.name[: -len(".safetensors")] + ".edit.safetensors")
    return out / FOLDER_MULTIPLIERS


def model_config(model, model_cfg: dict[str, Any] | None = None,
                 preprocess_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The {"model_cfg", "preprocess_cfg"} to write: given explicitly, or the LoadedModel's own."""
    if model_cfg is not None and "model_cfg" in model_cfg:  # a whole open_clip_config.json was passed
        preprocess_cfg = preprocess_cfg or model_cfg.get("preprocess_cfg")
        model_cfg = model_cfg["model_cfg"]
    if model_cfg is None:
        known = getattr(model, "config", None)
        if not known or "model_cfg" not in known:
            raise InvalidInput("model_cfg", "the model's open_clip architecture is unknown; pass model_cfg "
                               "(the open_clip model config it was built from)")
        model_cfg = known["model_cfg"]
        preprocess_cfg = preprocess_cfg if preprocess_cfg is not None else known.get("preprocess_cfg")
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise InvalidInput("model_cfg", "not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    return {"model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": dict(preprocess_cfg or {})}


def _manifest_text(manifest: dict[str, Any]) -> str:
    full = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest}
    try:
        return json.dumps(full, sort_keys=True)
    except TypeError as exc:
        raise InvalidInput("manifest", f"not JSON-serialisable: {exc}") from exc


def export_checkpoint(model, path: str | Path, manifest: dict[str, Any],
                      config: dict[str, Any] | None = None) -> None:
    """Write the full CLIP state dict (vision + text) to ``path`` with ``manifest`` (and, when given,
    the open_clip ``config`` {"model_cfg", "preprocess_cfg"}) in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidInput("output", f"edited checkpoints are written as .safetensors, got {path.name!r}")
    hf_export = getattr(_clip(model), "sith_export", None)
    if hf_export is not None:  # a transformers model writes its own format (sith.engine.towers.hf)
        hf_export(path, {MANIFEST_KEY: _manifest_text(manifest)})
        return
    metadata = {MANIFEST_KEY: _manifest_text(manifest)}
    if config is not None:
        metadata[CONFIG_KEY] = json.dumps(config, sort_keys=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in _clip(model).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    canonical_header(path)
    os.chmod(path, FILE_MODE)


def canonical_header(path: str | Path) -> None:
    """Sort the safetensors ``__metadata__`` keys in place, so one export is byte-identical every time.

    safetensors writes several metadata keys in hash-map order, which changes from run to run; an
    edit re-exported after a retried job must keep the sha256 it announced (and downloads resume by
    offset). The header is rewritten at the same length (padded with spaces, as safetensors pads).
    """
    path = Path(path)
    with path.open("r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= length:
            handle.seek(8)
            handle.write(text + b" " * (length - len(text)))
            return
    padded = text + b" " * (-len(text) % 8)  # longer than the original: rewrite the whole file
    tmp = path.with_name(path.name + ".tmp")
    with path.open("rb") as src, tmp.open("wb") as dst:
        src.seek(8 + length)
        dst.write(struct.pack("<Q", len(padded)) + padded)
        shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
    os.replace(tmp, path)


def export_folder(model, folder: str | Path, manifest: dict[str, Any], model_cfg: dict[str, Any] | None = None,
                  preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """open_clip's hf-hub layout, loadable with ``open_clip.create_model('local-dir:<folder>')``."""
    folder = Path(folder)
    config = model_config(model, model_cfg, preprocess_cfg)
    if folder.exists() and not folder.is_dir():
        raise InvalidInput("output", f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FOLDER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    export_checkpoint(model, folder / FOLDER_WEIGHTS, manifest, config)
    text = json.dumps(json.loads(_manifest_text(manifest)), indent=2) + "\n"
    (folder / FOLDER_MANIFEST).write_text(text, encoding="utf-8")
    return folder


def export_model(model, out: str | Path, manifest: dict[str, Any], model_cfg: dict[str, Any] | None = None,
                 preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Export ``model`` (an open_clip CLIP, or a LoadedModel) as a complete model: a folder, or one
    ``.safetensors`` file carrying its config when ``out`` ends in ``.safetensors`` (module docstring).

    ``model_cfg`` is the open_clip model config (or a whole ``open_clip_config.json`` dict); by
    default the LoadedModel's ``config``. Returns the path written.
    """
    out = Path(out)
    hf_export = getattr(_clip(model), "sith_export", None)
    if hf_export is not None:  # a transformers model writes its own format (sith.engine.towers.hf)
        written = Path(hf_export(out, {MANIFEST_KEY: _manifest_text(manifest)}))
        for file in [written] if written.is_file() else written.glob("*.safetensors"):
            canonical_header(file)
            os.chmod(file, FILE_MODE)
        return written
    if is_single_file(out):
        export_checkpoint(model, out, manifest, model_config(model, model_cfg, preprocess_cfg))
        return out
    return export_folder(model, out, manifest, model_cfg, preprocess_cfg)


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / FOLDER_WEIGHTS if (path / FOLDER_WEIGHTS).is_file() or not (path / "model.safetensors").is_file() \
            else path / "model.safetensors"  # a transformers folder (sith.engine.towers.hf)
    if not path.is_file():
        raise InvalidInput("checkpoint", f"file not found: {path}")
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a file (or a folder's weights), read from the header alone.

    Plain Python on purpose (8-byte little-endian header length, then the JSON header), so tools
    without torch or safetensors, such as the SDK, can do the same.
    """
    path = _weights_file(path)
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise InvalidInput("checkpoint", f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise InvalidInput("checkpoint", f"{path.name} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput("checkpoint", f"{path.name} is not a safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidInput("checkpoint", f"{path.name} is not a safetensors file")
    return dict(header.get("__metadata__") or {})


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The SITH manifest of an exported model (file, or folder)."""
    metadata = read_metadata(path)
    if MANIFEST_KEY not in metadata:
        raise InvalidInput("checkpoint", f"{Path(path).name} has no SITH manifest (not exported by `sith edit apply`)")
    return json.loads(metadata[MANIFEST_KEY])


def read_config(path: str | Path) -> dict[str, Any] | None:
    """The open_clip config of an export: the folder's ``open_clip_config.json`` or a file's metadata."""
    path = Path(path)
    if path.is_dir() and (path / FOLDER_CONFIG).is_file():
        return json.loads((path / FOLDER_CONFIG).read_text(encoding="utf-8"))
    text = read_metadata(path).get(CONFIG_KEY)
    return None if text is None else json.loads(text)


def unpack_checkpoint(path: str | Path, folder: str | Path) -> Path:
    """Turn a single-file export into the folder form (config from its metadata, the file as weights)."""
    path = Path(path)
    config = read_config(path)
    if config is None:
        raise InvalidInput("checkpoint", f"{path.name} carries no open_clip config (not a sith single-file export)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FOLDER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(path, folder / FOLDER_WEIGHTS)
    os.chmod(folder / FOLDER_WEIGHTS, FILE_MODE)
    metadata = read_metadata(path)
    if MANIFEST_KEY in metadata:
        text = json.dumps(json.loads(metadata[MANIFEST_KEY]), indent=2) + "\n"
        (folder / FOLDER_MANIFEST).write_text(text, encoding="utf-8")
    return folder
