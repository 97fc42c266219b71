"""Per-process model and analyzer pools: load once, keep the few most recently used.

Loading a CLIP and hashing its vision tower costs seconds; a worker process owns one device and
serves many jobs, so it keeps an LRU of loaded models (and of the Analyzers built on them, which hold
dictionaries and joint spaces). Models are reachable by the reference they were loaded with and by
their vision hash, which is what the server hands back to clients.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import redis

from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel, load_model, load_reference
from sith_workers.connection import outage_as_unavailable

T = TypeVar("T")
_HASH = re.compile(r"^[0-9a-f]{64}$")
ModelRef = str | dict[str, Any] | None


class ModelNotFound(InvalidInput):
    """A model hash that no loaded model has (maps to NOT_FOUND rather than INVALID_ARGUMENT)."""


class LRU(Generic[T]):
    """A small thread-safe least-recently-used map (evicted values are simply dropped)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._guard = threading.Lock()

    def get_or_create(self, key: Hashable, create: Callable[[], T]) -> T:
        with self._guard:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = create()                 # outside the guard: loads take seconds
        with self._guard:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def values(self) -> list[T]:
        with self._guard:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)


def canonical_ref(ref: ModelRef) -> str:
    """One string per reference, so equal references share a pool entry."""
    if ref is None:
        return "default"
    if isinstance(ref, dict):
        return json.dumps({k: str(v) for k, v in ref.items() if v is not None}, sort_keys=True)
    return ref.strip() or "default"


def load_ref(ref: ModelRef, device: str) -> LoadedModel:
    """Load a model reference: the default testbed model, ``name[/pretrained]``, ``hf-hub:...``,
    a folder or config JSON path, or a dict of ``load_model`` keyword arguments."""
    if isinstance(ref, dict):
        allowed = {"name", "pretrained", "checkpoint", "config"}
        unknown = sorted(set(ref) - allowed)
        if unknown:
            raise InvalidInput("model", f"unknown model reference keys {unknown}; use {sorted(allowed)}")
        return load_model(**{k: v for k, v in ref.items() if v is not None}, device=device)
    return load_reference(canonical_ref(ref), device)


class ModelRegistry:
    """vision hash -> reference, shared in Redis (``{prefix}:models``), so a hash that some worker
    loaded resolves on every worker. Tiny and without TTL."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "sith") -> None:
        self.redis = redis_client
        self.key = f"{prefix}:models"

    def remember(self, loaded: LoadedModel, ref: ModelRef) -> None:
        with outage_as_unavailable(self.redis):
            self.redis.hset(self.key, loaded.hash, json.dumps(ref))

    def lookup(self, model_hash: str) -> ModelRef:
        with outage_as_unavailable(self.redis):
            raw = self.redis.hget(self.key, model_hash)
        if raw is None:
            raise ModelNotFound("model", f"no model with hash {model_hash[:12]}… has been loaded by any worker; "
                                         "reference it by name or path")
        return json.loads(raw)


class ModelPool:
    """The models this worker process has loaded on its device (LRU of ``capacity``)."""

    def __init__(self, device: str = "cpu", capacity: int = 3, registry: ModelRegistry | None = None,
                 loader: Callable[[ModelRef, str], LoadedModel] = load_ref) -> None:
        self.device = device
        self.registry = registry
        self._models: LRU[LoadedModel] = LRU(capacity)
        self._loader = loader

    def get(self, ref: ModelRef) -> LoadedModel:
        """The loaded model for ``ref`` (loading it on first use); a 64-hex string is looked up
        among loaded models by vision hash."""
        text = canonical_ref(ref)
        if isinstance(ref, str) and _HASH.match(text):
            for loaded in self._models.values():
                if loaded.hash == text:
                    return loaded
            if self.registry is None:
                raise ModelNotFound("model", f"no model with hash {text[:12]}… is loaded on this worker")
            return self.get(self.registry.lookup(text))
        return self._models.get_or_create(text, lambda: self._load(ref))

    def _load(self, ref: ModelRef) -> LoadedModel:
        loaded = self._loader(ref, self.device)
        if self.registry is not None:
            self.registry.remember(loaded, ref)
        return loaded

    def __len__(self) -> int:
        return len(self._models)
