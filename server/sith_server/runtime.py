"""Models held in the server process: the preloaded base models and recently used edited ones.

Embeddings are answered here rather than by workers because their latency budget (≤ 1.3× a bare
in-process open_clip call) leaves no room for a queue round trip. Clients can only reach models
the operator preloaded (``SITH_MODELS``), never make the server open arbitrary paths.
"""

from __future__ import annotations

import difflib
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel, load_reference
from sith_server.errors import NotFound

log = logging.getLogger(__name__)
MAX_IMAGE_PIXELS = 40_000_000          # decoded size cap (decompression bombs)
EDITED_CACHE_SIZE = 4


@dataclass
class ServedModel:
    spec: str                          # what a worker passes to load_model (the SITH_MODELS entry)
    loaded: LoadedModel
    is_default: bool

    @property
    def image_size(self) -> int:
        size = self.loaded.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


class ModelRuntime:
    """Base models by name and hash, plus an LRU of edited models built on demand."""

    def __init__(self, device: str = "cpu", on_load: Callable[[str, float], None] | None = None) -> None:
        self.device = device
        self._models: list[ServedModel] = []
        self._edited: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._on_load = on_load or (lambda kind, seconds: None)

    # ---- base models --------------------------------------------------------------------------
    def preload(self, specs: Sequence[str]) -> None:
        """Load every spec (the first is the default); ``()`` loads the embedded testbed model."""
        for i, spec in enumerate(specs or ("",)):
            start = time.perf_counter()
            loaded = load_reference(spec, self.device)  # a SITH_MODELS entry
            self.add(spec, loaded, is_default=(i == 0 and not self._models), seconds=time.perf_counter() - start)

    def add(self, spec: str, loaded: LoadedModel, is_default: bool = False, seconds: float = 0.0) -> ServedModel:
        served = ServedModel(spec=spec, loaded=loaded, is_default=is_default or not self._models)
        self._models.append(served)
        self._on_load("base", seconds)
        log.info("serving model %s (%s)", loaded.name, loaded.hash[:12])
        return served

    @property
    def models(self) -> list[ServedModel]:
        return list(self._models)

    @property
    def default(self) -> ServedModel:
        if not self._models:
            raise NotFound("model", "(default)")
        return next(m for m in self._models if m.is_default)

    def get(self, ref: str, field: str = "model") -> ServedModel:
        """A served model by name, spec or hash (a unique hash prefix of ≥ 8 hex digits works too)."""
        if not ref:
            return self.default
        for m in self._models:
            if ref in (m.loaded.name, m.spec, m.loaded.hash):
                return m
        if len(ref) >= 8:
            by_prefix = [m for m in self._models if m.loaded.hash.startswith(ref)]
            if len(by_prefix) == 1:
                return by_prefix[0]
        names = [m.loaded.name for m in self._models]
        raise NotFound("model", ref, difflib.get_close_matches(ref, names, n=5, cutoff=0.3) or names[:5])

    # ---- edited models ------------------------------------------------------------------------
    def edited(self, edit_id: str, build: Callable[[], LoadedModel]) -> LoadedModel:
        """The edited model for ``edit_id``, built once by ``build`` and kept in a small LRU."""
        with self._lock:
            if edit_id in self._edited:
                self._edited.move_to_end(edit_id)
                return self._edited[edit_id]
        start = time.perf_counter()
        loaded = build()
        self._on_load("edited", time.perf_counter() - start)
        with self._lock:
            self._edited[edit_id] = loaded
            while len(self._edited) > EDITED_CACHE_SIZE:
                self._edited.popitem(last=False)
        return loaded

    def forget(self, edit_id: str) -> None:
        with self._lock:
            self._edited.pop(edit_id, None)


# ---- embedding ------------------------------------------------------------------------------

def image_batch(loaded: LoadedModel, tensors: Sequence[tuple[Sequence[int], bytes] | bytes],
                field: str) -> torch.Tensor:
    """Stack images into [N, 3, S, S]: raw (shape, float32 bytes) tensors or encoded PNG/JPEG."""
    size = loaded.model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    batch = []
    for i, item in enumerate(tensors):
        name = f"{field}[{i}]"
        if isinstance(item, bytes):
            batch.append(decode_image(loaded, item, f"{name}.encoded"))
            continue
        shape, data = item
        shape = tuple(int(s) for s in shape)
        if shape != (3, *size):
            raise InvalidInput(f"{name}.tensor.shape", f"expected [3, {size[0]}, {size[1]}] "
                               f"(already preprocessed), got {list(shape)}")
        if len(data) != 4 * int(np.prod(shape)):
            raise InvalidInput(f"{name}.tensor.data", f"expected {4 * int(np.prod(shape))} bytes of float32, "
                               f"got {len(data)}")
        array = np.frombuffer(data, dtype="<f4").reshape(shape)
        if not np.isfinite(array).all():
            raise InvalidInput(f"{name}.tensor.data", "contains NaN or infinite values")
        batch.append(torch.from_numpy(array.copy()))
    return torch.stack(batch)


def decode_image(loaded: LoadedModel, data: bytes, field: str) -> torch.Tensor:
    if loaded.preprocess is None:
        raise InvalidInput(field, "this model has no image transform; send preprocessed tensors")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise InvalidInput(field, f"expected PNG or JPEG, got {image.format}")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InvalidInput(field, f"image of {image.width}x{image.height} pixels is too large")
            return loaded.preprocess(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(field, f"cannot decode image: {exc}") from exc


def embed_images(loaded: LoadedModel, pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
    with torch.inference_mode():
        out = loaded.model.encode_image(pixels.to(next(loaded.model.parameters()).device), normalize=normalize)
    return out.float().cpu()


def embed_texts(loaded: LoadedModel, texts: Sequence[str], normalize: bool) -> torch.Tensor:
    tokens = loaded.tokenizer(list(texts))
    with torch.inference_mode():
        out = loaded.model.encode_text(tokens.to(next(loaded.model.parameters()).device), normalize=normalize)
    return out.float().cpu()


def classify(loaded: LoadedModel, pixels: torch.Tensor, labels: Sequence[str], template: str) -> torch.Tensor:
    """Zero-shot class probabilities [N, C] (CLIP's logit scale, softmax over labels)."""
    image = embed_images(loaded, pixels, normalize=True)
    text = embed_texts(loaded, [template.replace("{}", label) for label in labels], normalize=True)
    scale = loaded.model.logit_scale.exp().float().cpu() if hasattr(loaded.model, "logit_scale") else 100.0
    return (scale * image @ text.T).softmax(dim=-1)
