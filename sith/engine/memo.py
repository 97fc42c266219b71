"""Per-process memo of layer decompositions: each (model, layer) SVD is computed once per process.

Several consumers need the same per-layer SVDs within one process: the data-free image mean
decomposes every layer of the tower (``poles_mean`` twice over), then ``Analyzer.decomposition``
and ``decompose`` ask for the analysed layers again. They all go through ``layer_svd``.

Key: (vision hash, ``CONVENTION``, layer, device) — the same identity the ArtifactCache uses across
processes (a LoadedModel's hash names its weights). As a guard against weights changed in place
after loading (which leaves ``loaded.hash`` stale), each entry remembers the parameter storage
pointers and autograd version counters of the tower it came from: the same tower with bumped
versions is recomputed and the entry dropped; another tower object with the same hash (a second
load of the same weights) shares the entry. Writes through ``param.data`` bypass version counters,
so code that edits a loaded model in place must re-hash it (or call ``clear()``).

Bounded: least recently used entries are evicted beyond ``SITH_MEMO_MB`` (default 1024 MiB;
ViT-L-14's 24 layers take 200 MiB, ViT-H-14's 32 layers 420 MiB); 0 disables the memo.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from sith.engine.decomposition import CONVENTION, LayerSVD
from sith.engine.errors import InvalidInput

ENV = "SITH_MEMO_MB"
DEFAULT_MB = 1024


@dataclass
class _Entry:
    svd: LayerSVD
    pointers: tuple[int, ...]
    versions: tuple[int, ...]
    nbytes: int


def _state(module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    params = list(module.parameters())
    pointers = tuple(p.data_ptr() for p in params)
    try:
        versions = tuple(p._version for p in params)
    except RuntimeError:  # inference tensors carry no version counter
        versions = ()
    return pointers, versions


def _tower(loaded) -> nn.Module:
    return getattr(loaded.model, "visual", loaded.model)


def budget_bytes() -> int:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_MB << 20
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if mb < 0:
        raise InvalidInput(ENV, f"expected a non-negative number of MiB, got {value!r}")
    return int(mb * (1 << 20))


class DecompositionMemo:
    """LRU map (hash, convention, layer, device) -> LayerSVD, bounded in bytes; thread-safe."""

    def __init__(self, budget: int | None = None) -> None:
        self._budget = budget
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    @property
    def budget(self) -> int:
        return budget_bytes() if self._budget is None else self._budget

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def layer_svd(self, loaded, layer: int, compute: Callable[[], LayerSVD]) -> LayerSVD:
        """``compute()`` the first time this (model, layer) is asked for in this process, else the stored SVD."""
        tower = _tower(loaded)
        pointers, versions = _state(tower)
        device = str(next(tower.parameters()).device)
        key = (loaded.hash, CONVENTION, int(layer), device)
        with self._lock:  # held while computing, so concurrent callers wait instead of duplicating the work
            entry = self._entries.get(key)
            if entry is not None:
                if entry.pointers != pointers or entry.versions == versions:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry.svd
                del self._entries[key]  # the same tower changed in place: its hash no longer names it
                self.misses += 1
                return compute()
            self.misses += 1
            svd = compute()
            nbytes = sum(t.numel() * t.element_size() for t in (svd.U, svd.S, svd.V))
            budget = self.budget
            if nbytes <= budget:
                self._entries[key] = _Entry(svd, pointers, versions, nbytes)
                while self.nbytes > budget:
                    self._entries.popitem(last=False)
            return svd


_MEMO = DecompositionMemo()


def layer_svd(loaded, layer: int, compute: Callable[[], LayerSVD]) -> LayerSVD:
    """The process-wide memo (see the module docstring)."""
    return _MEMO.layer_svd(loaded, layer, compute)


def process_memo() -> DecompositionMemo:
    return _MEMO
