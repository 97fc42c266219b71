"""Edited models in the server: base weights + the edit's multipliers, in stock open_clip layout.

The multipliers are relative to the base model's SVD, so applying them needs the base
decomposition of the edited layers only (a few per-head SVDs of the factors, kept per model).
Checkpoints for download are exported once per edit into ``SITH_DATA_DIR/edits``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from sith.edits.apply import apply_multipliers
from sith.edits.export import export_checkpoint
from sith.edits.multipliers import Multipliers
from sith.engine.decomposition import LayerSVD, decompose
from sith.engine.models import LoadedModel, vision_hash

CHUNK_BYTES = 1024 * 1024
_svd_lock = threading.Lock()
_svd_cache: dict[tuple[str, int], LayerSVD] = {}


def base_decomposition(base: LoadedModel, layers: list[int]) -> dict[int, LayerSVD]:
    with _svd_lock:
        missing = [layer for layer in layers if (base.hash, layer) not in _svd_cache]
        if missing:
            for layer, svd in decompose(base, missing).items():
                _svd_cache[(base.hash, layer)] = svd
        return {layer: _svd_cache[(base.hash, layer)] for layer in layers}


def build(base: LoadedModel, multipliers_bytes: bytes, label: str) -> LoadedModel:
    multipliers = Multipliers.from_bytes(multipliers_bytes)
    model = apply_multipliers(base.model, multipliers, base_decomposition(base, multipliers.layers))
    model = model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=base.tokenizer, name=label, hash=vision_hash(model),
                       info=base.info, preprocess=base.preprocess)


def checkpoint(path: Path, edited: LoadedModel, manifest: dict) -> tuple[Path, str]:
    """Export once (atomically, so a concurrent download never sees half a file); return path, sha256."""
    digest_path = path.with_suffix(path.suffix + ".sha256")
    if not (path.is_file() and digest_path.is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors")
        os.close(fd)
        try:
            export_checkpoint(edited.model, tmp, manifest)
            digest = sha256_file(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        digest_path.write_text(digest)
    return path, digest_path.read_text().strip()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def chunks(path: Path, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, block) pairs of at most CHUNK_BYTES from byte ``start`` on."""
    with path.open("rb") as f:
        f.seek(start)
        offset = start
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            yield offset, block
            offset += len(block)
