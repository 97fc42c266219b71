"""Where derived artifacts (decompositions, dictionary embeddings, codes) are kept between runs.

The engine only sees ``ArtifactCache``: get/put bytes under a content-addressed key. The CLI uses
``DiskCache``, tests ``MemoryCache``, and the workers plug Redis in behind the same protocol; the
``tensors_to_bytes`` / ``tensors_from_bytes`` helpers (safetensors: no pickle, zero-copy friendly)
give every backend the same byte format.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import re
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save


@runtime_checkable
class ArtifactCache(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


class MemoryCache:
    """A dict; lives as long as the process."""

    def __init__(self) -> None:
        self._items: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self._items.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._items[key] = bytes(value)

    def __len__(self) -> int:
        return len(self._items)


_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class DiskCache:
    """One file per key under ``root``; writes are atomic (temp file + rename) so readers never see halves."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        # Keys carry '/' and ':' separators; keep them readable but filesystem-safe, and add a short
        # digest so two keys that sanitise alike never collide.
        safe = _SAFE.sub("_", key)[:150]
        return self.root / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.bin"

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, value: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(value)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def data_dir() -> Path:
    """``$SITH_DATA_DIR`` or ``~/.cache/sith``."""
    return Path(os.environ.get("SITH_DATA_DIR") or Path.home() / ".cache" / "sith").expanduser()


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return _st_save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, metadata=metadata)


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return _st_load(data)


def tensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata ``tensors_to_bytes`` stored, read from the header alone (no tensor copy)."""
    if len(data) < 8:
        raise ValueError("not a safetensors payload (shorter than its header length)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("not a safetensors payload (header longer than the data)")
    return json.loads(bytes(data[8 : 8 + length])).get("__metadata__") or {}
