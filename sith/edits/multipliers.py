"""An edit on its own: one multiplier α per singular vector, relative to the BASE model's SVD.

Semantics (why they are defined against the base decomposition): after an edit the singular values
are re-sorted, zeroed vectors become degenerate and flipped ones change sign, so indices of the
edited model's own SVD no longer name the same directions. Keeping α indexed by the base's
(layer, head, index) makes every operation exact:

* apply:   W_VO^h = U_h diag(α_h ⊙ σ_h) V_hᵀ with the base U, σ, V;
* compose: (a ∘ b) = elementwise product (absent layers count as all-ones), so applying a ∘ b to
  the base equals applying a, then b, to the same base directions;
* revert:  apply the all-ones multipliers (or ``a.compose(a.inverse())``) with the base
  decomposition; ``inverse`` divides and therefore refuses any α = 0 (a suppressed vector's
  direction is gone from the edited weights, only the base can bring it back).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import Tensor

from sith.engine.errors import InvalidInput

FORMAT = "sith-multipliers"
FORMAT_VERSION = 1
UNIT_TOLERANCE = 1e-6


class Multipliers:
    """{layer: Tensor [H, r]} of α (1.0 = unchanged), plus the hash of the model they refer to."""

    def __init__(self, values: Mapping[int, Tensor], model_hash: str | None = None) -> None:
        self.values: dict[int, Tensor] = {}
        shape = None
        for layer, alpha in sorted(values.items()):
            alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().cpu().clone()
            if alpha.ndim != 2:
                raise InvalidInput("multipliers", f"layer {layer}: expected [heads, rank], got {tuple(alpha.shape)}")
            if shape is not None and alpha.shape != shape:
                raise InvalidInput("multipliers", f"layer {layer}: shape {tuple(alpha.shape)} differs from {tuple(shape)}")
            if not torch.isfinite(alpha).all():
                raise InvalidInput("multipliers", f"layer {layer}: contains NaN or infinite values")
            shape = alpha.shape
            self.values[int(layer)] = alpha
        self.model_hash = model_hash

    @classmethod
    def ones(cls, layers: Iterable[int], heads: int, rank: int, model_hash: str | None = None) -> Multipliers:
        return cls({layer: torch.ones(heads, rank) for layer in layers}, model_hash)

    @property
    def layers(self) -> list[int]:
        return sorted(self.values)

    def changed(self) -> list[tuple[int, int, int, float]]:
        """(layer, head, index, α) of every vector whose α differs from 1."""
        out = []
        for layer, alpha in self.values.items():
            for h, j in (alpha != 1.0).nonzero().tolist():
                out.append((layer, h, j, float(alpha[h, j])))
        return sorted(out)

    def to_manifest(self) -> dict:
        """Compact JSON form (only α ≠ 1 listed) for checkpoint manifests and API replies."""
        shape = next(iter(self.values.values())).shape if self.values else (0, 0)
        return {"model_hash": self.model_hash, "layers": self.layers, "shape": list(shape),
                "changed": [list(item) for item in self.changed()]}

    @classmethod
    def from_manifest(cls, d: dict) -> Multipliers:
        try:
            heads, rank = d["shape"]
            values = {int(layer): torch.ones(heads, rank) for layer in d["layers"]}
            for layer, head, index, alpha in d["changed"]:
                values[int(layer)][int(head), int(index)] = float(alpha)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInput("manifest.multipliers", f"malformed multipliers: {exc!r}") from exc
        return cls(values, d.get("model_hash"))

    def _check_compatible(self, other: Multipliers) -> None:
        if self.model_hash and other.model_hash and self.model_hash != other.model_hash:
            raise InvalidInput("multipliers", "the two edits refer to different base models "
                               f"({self.model_hash[:12]} vs {other.model_hash[:12]})")
        for layer in set(self.values) & set(other.values):
            if self.values[layer].shape != other.values[layer].shape:
                raise InvalidInput("multipliers", f"layer {layer}: shapes differ")

    def compose(self, other: Multipliers) -> Multipliers:
        """Elementwise product; a layer present in only one edit keeps that edit's α."""
        self._check_compatible(other)
        merged = {layer: alpha.clone() for layer, alpha in self.values.items()}
        for layer, alpha in other.values.items():
            merged[layer] = merged[layer] * alpha if layer in merged else alpha.clone()
        for layer, alpha in merged.items():  # a ∘ a⁻¹ must read as "unchanged", not 0.99999994
            merged[layer] = torch.where((alpha - 1).abs() <= UNIT_TOLERANCE, torch.ones_like(alpha), alpha)
        return Multipliers(merged, self.model_hash or other.model_hash)

    def inverse(self) -> Multipliers:
        """1/α; refuses α = 0, whose direction can only be restored from the base weights."""
        for layer, alpha in self.values.items():
            zero = (alpha == 0).nonzero().tolist()
            if zero:
                h, j = zero[0]
                raise InvalidInput("multipliers", f"cannot invert: layer {layer} head {h} vector {j} has α = 0 "
                                   f"({len(zero)} such vector(s)); revert by re-applying to the base model")
        return Multipliers({layer: 1.0 / alpha for layer, alpha in self.values.items()}, self.model_hash)

    def is_identity(self) -> bool:
        return all(bool((alpha == 1.0).all()) for alpha in self.values.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Multipliers) or set(self.values) != set(other.values):
            return False
        return all(torch.equal(self.values[k], other.values[k]) for k in self.values)

    def to_bytes(self) -> bytes:
        tensors = {f"layer.{layer}": alpha.contiguous() for layer, alpha in self.values.items()}
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "model_hash": self.model_hash or ""}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> Multipliers:
        try:
            tensors = load(data)
        except Exception as exc:  # not a safetensors buffer
            raise InvalidInput("multipliers", f"not a SITH multipliers file: {exc}") from exc
        meta = _metadata(data)
        if meta.get("format") != FORMAT:
            raise InvalidInput("multipliers", f"not a SITH multipliers file (format {meta.get('format')!r})")
        if int(meta.get("version", "0")) > FORMAT_VERSION:
            raise InvalidInput("multipliers", f"written by a newer version ({meta['version']})")
        values = {}
        for key, alpha in tensors.items():
            prefix, _, layer = key.partition(".")
            if prefix != "layer" or not layer.isdigit():
                raise InvalidInput("multipliers", f"unexpected tensor {key!r}")
            values[int(layer)] = alpha
        return cls(values, meta.get("model_hash") or None)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Multipliers:
        path = Path(path)
        if not path.is_file():
            raise InvalidInput("multipliers", f"file not found: {path}")
        return cls.from_bytes(path.read_bytes())


def _metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ block of a safetensors buffer (header = 8-byte length + JSON)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__", {}) or {}
