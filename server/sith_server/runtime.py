"""Models held in the server process: the preloaded base models and recently used edited ones.

Embeddings are answered here rather than by workers because their latency budget (≤ 1.3× a bare
in-process open_clip call) leaves no room for a queue round trip. Clients can only reach models
the operator preloaded (``SITH_MODELS``), never make the server open arbitrary paths.

Edited models are never computed here: a worker exported each edit's checkpoint once, and the
server loads those weights into a copy of the base model, once per edit (concurrent first calls
wait for the one load: single-flight), keeping as many as fit a memory budget
(``SITH_EDITED_MODELS_BYTES``, default 1 GiB; the least recently used goes first).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel, load_reference
from sith_server import images
from sith_server.errors import NotFound
from sith_server.limits import check_call

log = logging.getLogger(__name__)
TEXT_BATCH = 64                        # texts per forward pass; cancellation is checked between batches
IMAGE_BATCH = 32
WORD_MAX_CHARS = 64                    # BPE is quadratic in a word's length: longer words are cut
CHARS_PER_TOKEN_BUDGET = 8             # a text keeps at most context_length x 8 characters
TOKENIZER_CACHE_ENTRIES = 20_000
TEXT_MAX_CHARS = 2000                  # absolute cap per text (SITH_TEXT_MAX_CHARS), below the model's budget
_tokenizer_lock = threading.Lock()     # the bounded cache is cleared under it (open_clip's bpe reads it unlocked)
DEFAULT_EDITED_BYTES = 1 << 30


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (what an edited copy costs in memory)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


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

    def __init__(self, device: str = "cpu", on_load: Callable[[str, float], None] | None = None,
                 edited_bytes: int | None = None) -> None:
        self.device = device
        self._models: list[ServedModel] = []
        self._edited: OrderedDict[str, tuple[LoadedModel, int]] = OrderedDict()
        self._building: dict[str, Future] = {}
        self.edited_budget = edited_bytes if edited_bytes is not None else int(
            os.environ.get("SITH_EDITED_MODELS_BYTES") or DEFAULT_EDITED_BYTES)
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
            raise NotFound("model", "(default)", field="model")
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
        raise NotFound("model", ref, difflib.get_close_matches(ref, names, n=5, cutoff=0.3) or names[:5], field=field)

    # ---- edited models ------------------------------------------------------------------------
    def edited(self, key: str, build: Callable[[], LoadedModel]) -> LoadedModel:
        """The edited model for ``key`` (an edit and its artifact's digest), built by ``build`` once
        however many calls ask at the same time, and kept while it fits the memory budget."""
        with self._lock:
            if key in self._edited:
                self._edited.move_to_end(key)
                return self._edited[key][0]
            pending = self._building.get(key)
            owner = pending is None
            if owner:
                pending = self._building[key] = Future()
        if not owner:
            return pending.result()
        try:
            start = time.perf_counter()
            loaded = build()
            self._on_load("edited", time.perf_counter() - start)
        except BaseException as exc:
            with self._lock:
                self._building.pop(key, None)
            pending.set_exception(exc)
            raise
        size = model_bytes(loaded.model)
        with self._lock:
            self._edited[key] = (loaded, size)
            while len(self._edited) > 1 and sum(n for _, n in self._edited.values()) > self.edited_budget:
                self._edited.popitem(last=False)
            self._building.pop(key, None)
        pending.set_result(loaded)
        return loaded

    def forget(self, edit_id: str) -> None:
        """Drop every cached model of this edit (keys start with its id)."""
        with self._lock:
            for key in [k for k in self._edited if k.startswith(edit_id)]:
                del self._edited[key]

    @property
    def edited_in_memory(self) -> int:
        with self._lock:
            return len(self._edited)


def load_edited(base: LoadedModel, path: str, label: str) -> LoadedModel:
    """The base model with an exported edit's weights (a worker wrote them; nothing is computed)."""
    from safetensors.torch import load_file

    from sith.engine.models import vision_hash

    model = copy.deepcopy(base.model)
    state = load_file(path, device=str(next(base.model.parameters()).device))
    model.load_state_dict(state, strict=True)
    model = model.eval().requires_grad_(False)
    return dataclasses.replace(base, model=model, name=label, hash=vision_hash(model))


# ---- embedding ------------------------------------------------------------------------------

def image_batch(loaded: LoadedModel, tensors: Sequence[tuple[Sequence[int], bytes] | bytes],
                field: str) -> torch.Tensor:
    """Stack images into [N, 3, S, S]: raw (shape, float32 bytes) tensors or encoded PNG/JPEG."""
    size = loaded.model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    encoded = [(i, item) for i, item in enumerate(tensors) if isinstance(item, bytes)]
    decoded = dict(zip((i for i, _ in encoded),
                       images.decode_images(loaded, [data for _, data in encoded], field,
                                            indices=[i for i, _ in encoded]))) if encoded else {}
    batch = []
    for i, item in enumerate(tensors):
        name = f"{field}[{i}]"
        if isinstance(item, bytes):
            batch.append(decoded[i])
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
    """One encoded image under the process's pixel budgets (see sith_server.images)."""
    return images.decode_images(loaded, [data], field.removesuffix(".encoded").rsplit("[", 1)[0],
                                indices=[_index(field)])[0]


def _index(field: str) -> int:
    try:
        return int(field.removesuffix(".encoded").rsplit("[", 1)[1].rstrip("]"))
    except (IndexError, ValueError):
        return 0


def embed_images(loaded: LoadedModel, pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Image embeddings in batches, stopping between batches if the call was cancelled or timed out."""
    device = next(loaded.model.parameters()).device
    out = []
    for start in range(0, pixels.shape[0], IMAGE_BATCH):
        check_call()
        with torch.inference_mode():
            out.append(loaded.model.encode_image(pixels[start:start + IMAGE_BATCH].to(device),
                                                 normalize=normalize).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def context_length(loaded: LoadedModel) -> int:
    length = (getattr(inner_tokenizer(loaded.tokenizer), "context_length", None)
              or getattr(loaded.model, "context_length", None))
    return int(length or 77)


def configure_text_limits(max_chars: int, cache_entries: int) -> None:
    """This process's text limits (the app sets them from ServerConfig.limits)."""
    global TEXT_MAX_CHARS, TOKENIZER_CACHE_ENTRIES
    TEXT_MAX_CHARS, TOKENIZER_CACHE_ENTRIES = max_chars, cache_entries


def clip_text(text: str, context: int, max_chars: int | None = None) -> str:
    """``text`` cut, cheaply and before tokenising, to what can reach the model's ``context`` tokens.

    Every word yields at least one token, so words past the first ``context`` are never read; each
    word is cut to WORD_MAX_CHARS (BPE time grows with the square of a word's length) and the whole
    to ``context`` x CHARS_PER_TOKEN_BUDGET characters (and ``max_chars``, default TEXT_MAX_CHARS).
    Texts that fit the context come out unchanged up to whitespace, which the CLIP tokenizer
    collapses anyway, unless a word is longer than WORD_MAX_CHARS.
    """
    budget = min(context * CHARS_PER_TOKEN_BUDGET, TEXT_MAX_CHARS if max_chars is None else max_chars)
    words = text.lstrip()[:budget * 2].split(maxsplit=context)[:context]
    clipped = " ".join(w[:WORD_MAX_CHARS] for w in words)
    return clipped[:budget]


class BoundedCache(dict):
    """open_clip's BPE word cache, cleared (but for its special tokens) when it outgrows ``limit``:
    the stock dict grows by one entry per distinct word ever seen (700k words = 125 MiB)."""

    def __init__(self, initial: dict, limit: int) -> None:
        super().__init__(initial)
        self.keep = dict(initial)
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        if len(self) >= self.limit:
            self.clear()
            self.update(self.keep)
        super().__setitem__(key, value)


def inner_tokenizer(tokenizer: object) -> object:
    """The tokenizer behind a ``LazyTokenizer`` wrapper once it is built (else ``tokenizer`` itself)."""
    return getattr(tokenizer, "_tokenizer", None) or tokenizer


def bound_tokenizer_cache(tokenizer: object, limit: int | None = None) -> None:
    """Replace a SimpleTokenizer's unbounded ``cache`` with a BoundedCache (idempotent)."""
    tokenizer = inner_tokenizer(tokenizer)
    cache = getattr(tokenizer, "cache", None)
    if isinstance(cache, dict) and not isinstance(cache, BoundedCache):
        special = {k: v for k, v in cache.items() if k.startswith("<") and k.endswith(">")}
        tokenizer.cache = BoundedCache(special, limit or TOKENIZER_CACHE_ENTRIES)   # type: ignore[attr-defined]


def tokenize(loaded: LoadedModel, texts: Sequence[str], max_chars: int | None = None) -> torch.Tensor:
    """Token ids [N, context] of texts clipped by :func:`clip_text`, with a bounded tokenizer cache."""
    context = context_length(loaded)
    clipped = [clip_text(t, context, max_chars) for t in texts]
    with _tokenizer_lock:
        bound_tokenizer_cache(loaded.tokenizer)
        tokens = loaded.tokenizer(clipped)
        bound_tokenizer_cache(loaded.tokenizer)        # a lazy tokenizer exists only after its first call
        return tokens


def embed_texts(loaded: LoadedModel, texts: Sequence[str], normalize: bool,
                max_chars: int | None = None) -> torch.Tensor:
    """Text embeddings in batches, stopping between batches if the call was cancelled or timed out."""
    device = next(loaded.model.parameters()).device
    texts = list(texts)
    out = []
    for start in range(0, len(texts), TEXT_BATCH):
        check_call()
        tokens = tokenize(loaded, texts[start:start + TEXT_BATCH], max_chars)
        check_call()
        with torch.inference_mode():
            out.append(loaded.model.encode_text(tokens.to(device), normalize=normalize).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def classify(loaded: LoadedModel, pixels: torch.Tensor, labels: Sequence[str], template: str) -> torch.Tensor:
    """Zero-shot class probabilities [N, C] (CLIP's logit scale, softmax over labels)."""
    image = embed_images(loaded, pixels, normalize=True)
    text = embed_texts(loaded, [template.replace("{}", label) for label in labels], normalize=True)
    scale = loaded.model.logit_scale.exp().float().cpu() if hasattr(loaded.model, "logit_scale") else 100.0
    return (scale * image @ text.T).softmax(dim=-1)
