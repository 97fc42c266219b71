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

Beyond the paper, an edit may also carry **rank-one write maps** (operators.py): a writer (a head,
a block's MLP output, or the output projection) gets W ← W T with T = I − (1 − a) u vᵀ, vᵀu = 1 (row-vector form: the
write w becomes w T, so its component along u is multiplied by a and the change lies along v).
An *anchored* map (plan.py: what is removed is partly re-written along an anchor concept) has
v = v₀ − κ â, so vᵀu = c lies in [0, 2] instead of 1.
They are stored after the α (per writer, in application order) and follow the same rules:
compose = the lists concatenated (a's maps, then b's), inverse = the lists reversed with
a → 1 + (1 − a) / (1 − (1 − a) c) (Sherman–Morrison; 1/a when c = 1; refused where T is singular,
such as a = 0 with c = 1), revert = apply nothing. The (u, v) pairs are stored once and shared by every
writer of an operation, which keeps an all-heads edit of a large tower small.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import Tensor

from sith.engine.errors import InvalidInput

FORMAT = "sith-multipliers"
FORMAT_VERSION = 1
UNIT_TOLERANCE = 1e-6
SITES = ("head", "mlp", "output")
# vᵀu must be 1 for T = I − (1 − a) u vᵀ to scale u by exactly a; an anchored map's lies in [0, 2].
PAIR_TOLERANCE = 1e-6
MAX_PAIR_PRODUCT = 2.0


@dataclass(frozen=True)
class WriteMap:
    """T = I − (1 − alpha) u vᵀ applied to one writer; ``pair`` indexes ``Multipliers.pairs``.

    site "head": (layer, head) of an attention head (u, v in residual width d);
    site "mlp": the MLP output weights of block ``layer`` (head = -1; u, v in residual width d);
    site "output": the output projection ``visual.proj`` (layer = head = -1; u, v in joint width D).
    """

    site: str
    layer: int
    head: int
    pair: int
    alpha: float

    @property
    def writer(self) -> tuple[str, int, int]:
        return (self.site, self.layer, self.head)


def rank_one(u: Tensor, v: Tensor, alpha: float) -> Tensor:
    """The dense T = I − (1 − α) u vᵀ (float64)."""
    u, v = u.double(), v.double()
    return torch.eye(u.numel(), dtype=torch.float64) - (1.0 - alpha) * torch.outer(u, v)


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.double().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> Tensor:
    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float64).copy())


class Multipliers:
    """{layer: Tensor [H, r]} of α (1.0 = unchanged), optional rank-one write maps, and the hash of
    the model they refer to."""

    def __init__(self, values: Mapping[int, Tensor], model_hash: str | None = None,
                 pairs: list[tuple[Tensor, Tensor]] | None = None, maps: list[WriteMap] | None = None) -> None:
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
        self.pairs: list[tuple[Tensor, Tensor]] = []
        for i, (u, v) in enumerate(pairs or []):
            u = torch.as_tensor(u, dtype=torch.float64).detach().cpu().reshape(-1).clone()
            v = torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(-1).clone()
            if u.shape != v.shape or not (torch.isfinite(u).all() and torch.isfinite(v).all()):
                raise InvalidInput("multipliers", f"write-map pair {i}: u and v must be finite and of equal length")
            if not -PAIR_TOLERANCE <= float(v @ u) <= MAX_PAIR_PRODUCT + PAIR_TOLERANCE:
                raise InvalidInput("multipliers", f"write-map pair {i}: vᵀu = {float(v @ u):.6g}, expected 1 (or "
                                   f"within [0, {MAX_PAIR_PRODUCT:g}] for an anchored map)")
            self.pairs.append((u, v))
        self.maps: list[WriteMap] = []
        for m in maps or []:
            if m.site not in SITES:
                raise InvalidInput("multipliers", f"unknown write-map site {m.site!r}; use one of {list(SITES)}")
            if not 0 <= m.pair < len(self.pairs):
                raise InvalidInput("multipliers", f"write map on {m.writer} names pair {m.pair}, "
                                   f"but only {len(self.pairs)} pair(s) are stored")
            if not torch.isfinite(torch.tensor(float(m.alpha))):
                raise InvalidInput("multipliers", f"write map on {m.writer}: α must be finite")
            if m.site == "mlp" and (m.head != -1 or m.layer < 0):
                raise InvalidInput("multipliers", f"write map on {m.writer}: an MLP map names a layer >= 0 and "
                                   "head -1")
            if m.site == "head" and m.layer not in self.values:
                raise InvalidInput("multipliers", f"write map on layer {m.layer} head {m.head}: the layer has no "
                                   "α entry (every edited head's layer must be listed)")
            self.maps.append(WriteMap(m.site, int(m.layer), int(m.head), int(m.pair), float(m.alpha)))

    @classmethod
    def ones(cls, layers: Iterable[int], heads: int, rank: int, model_hash: str | None = None) -> Multipliers:
        return cls({layer: torch.ones(heads, rank) for layer in layers}, model_hash)

    def maps_for(self, site: str, layer: int = -1, head: int = -1) -> list[WriteMap]:
        """This writer's maps in application order."""
        return [m for m in self.maps if m.writer == (site, layer, head)]

    def write_matrix(self, site: str, layer: int = -1, head: int = -1) -> Tensor | None:
        """The product T₁ T₂ … of a writer's maps (float64), or None when it has none."""
        maps = self.maps_for(site, layer, head)
        if not maps:
            return None
        out = None
        for m in maps:
            u, v = self.pairs[m.pair]
            t = rank_one(u, v, m.alpha)
            out = t if out is None else out @ t
        return out

    def map_vector(self, x: Tensor, site: str, layer: int = -1, head: int = -1) -> Tensor:
        """T₁T₂… x (column side) without forming T: cheap for wide towers."""
        x = x.double()
        for m in reversed(self.maps_for(site, layer, head)):
            u, v = self.pairs[m.pair]
            x = x - (1.0 - m.alpha) * u * (v @ x)
        return x

    def map_rows(self, rows: Tensor, site: str, layer: int = -1, head: int = -1) -> Tensor:
        """rows T₁T₂… (row side) without forming T."""
        rows = rows.double()
        for m in self.maps_for(site, layer, head):
            u, v = self.pairs[m.pair]
            rows = rows - (1.0 - m.alpha) * (rows @ u)[..., None] * v
        return rows

    def mapped_writers(self) -> list[tuple[str, int, int]]:
        return sorted({m.writer for m in self.maps})

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
        """Compact JSON form (only α ≠ 1 listed) for checkpoint manifests and API replies.

        Write maps, when present, are listed as [site, layer, head, pair, α] with the pairs as
        base64 float64 (exact, and small: one pair per operation)."""
        shape = next(iter(self.values.values())).shape if self.values else (0, 0)
        out = {"model_hash": self.model_hash, "layers": self.layers, "shape": list(shape),
               "changed": [list(item) for item in self.changed()]}
        if self.maps:
            out["pairs"] = [[_b64(u), _b64(v)] for u, v in self.pairs]
            out["maps"] = [[m.site, m.layer, m.head, m.pair, m.alpha] for m in self.maps]
        return out

    @classmethod
    def from_manifest(cls, d: dict) -> Multipliers:
        try:
            heads, rank = d["shape"]
            values = {int(layer): torch.ones(heads, rank) for layer in d["layers"]}
            for layer, head, index, alpha in d["changed"]:
                values[int(layer)][int(head), int(index)] = float(alpha)
            pairs = [(_unb64(u), _unb64(v)) for u, v in d.get("pairs", [])]
            maps = [WriteMap(str(site), int(layer), int(head), int(pair), float(alpha))
                    for site, layer, head, pair, alpha in d.get("maps", [])]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInput("manifest.multipliers", f"malformed multipliers: {exc!r}") from exc
        return cls(values, d.get("model_hash"), pairs, maps)

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
        pairs, maps = _merge_maps(self, other)
        return Multipliers(merged, self.model_hash or other.model_hash, pairs, maps)

    def inverse(self) -> Multipliers:
        """1/α and the write maps reversed with a → 1/a; refuses α = 0 or a = 0, whose direction can
        only be restored from the base weights."""
        for layer, alpha in self.values.items():
            zero = (alpha == 0).nonzero().tolist()
            if zero:
                h, j = zero[0]
                raise InvalidInput("multipliers", f"cannot invert: layer {layer} head {h} vector {j} has α = 0 "
                                   f"({len(zero)} such vector(s)); revert by re-applying to the base model")
        maps = []
        for m in reversed(self.maps):
            u, v = self.pairs[m.pair]
            denominator = 1.0 - (1.0 - m.alpha) * float(v @ u)  # T = I − (1 − a) u vᵀ is singular at 0
            if abs(denominator) < PAIR_TOLERANCE:
                raise InvalidInput("multipliers", f"cannot invert: the write map on {m.writer} removes its "
                                   f"direction (a = {m.alpha:g}); revert by re-applying to the base model")
            maps.append(WriteMap(m.site, m.layer, m.head, m.pair, 1.0 + (1.0 - m.alpha) / denominator))
        return Multipliers({layer: 1.0 / alpha for layer, alpha in self.values.items()}, self.model_hash,
                           self.pairs, maps)

    def is_identity(self) -> bool:
        return not self.maps and all(bool((alpha == 1.0).all()) for alpha in self.values.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Multipliers) or set(self.values) != set(other.values):
            return False
        if self.maps != other.maps or len(self.pairs) != len(other.pairs):
            return False
        if not all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(self.pairs, other.pairs)):
            return False
        return all(torch.equal(self.values[k], other.values[k]) for k in self.values)

    def to_bytes(self) -> bytes:
        tensors = {f"layer.{layer}": alpha.contiguous() for layer, alpha in self.values.items()}
        for i, (u, v) in enumerate(self.pairs):
            tensors[f"pair.{i}.u"] = u.contiguous()
            tensors[f"pair.{i}.v"] = v.contiguous()
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "model_hash": self.model_hash or ""}
        if self.maps:
            meta["maps"] = json.dumps([[m.site, m.layer, m.head, m.pair, m.alpha] for m in self.maps])
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
        values, halves = {}, {}
        for key, alpha in tensors.items():
            prefix, _, layer = key.partition(".")
            if prefix == "pair":
                index, _, part = layer.partition(".")
                if index.isdigit() and part in ("u", "v"):
                    halves[(int(index), part)] = alpha
                    continue
            if prefix != "layer" or not layer.isdigit():
                raise InvalidInput("multipliers", f"unexpected tensor {key!r}")
            values[int(layer)] = alpha
        count = len(halves) // 2
        if any((i, part) not in halves for i in range(count) for part in ("u", "v")) or len(halves) % 2:
            raise InvalidInput("multipliers", "incomplete write-map pairs")
        pairs = [(halves[(i, "u")], halves[(i, "v")]) for i in range(count)]
        try:
            maps = [WriteMap(str(site), int(layer), int(head), int(pair), float(alpha))
                    for site, layer, head, pair, alpha in json.loads(meta.get("maps", "[]"))]
        except (TypeError, ValueError) as exc:
            raise InvalidInput("multipliers", f"malformed write maps: {exc!r}") from exc
        return cls(values, meta.get("model_hash") or None, pairs, maps)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Multipliers:
        path = Path(path)
        if not path.is_file():
            raise InvalidInput("multipliers", f"file not found: {path}")
        return cls.from_bytes(path.read_bytes())


def _merge_maps(a: Multipliers, b: Multipliers) -> tuple[list[tuple[Tensor, Tensor]], list[WriteMap]]:
    """a's maps then b's, pairs de-duplicated; a map followed (on the same writer) by its exact
    inverse cancels. A map whose inverse arrives after another map on that writer cannot be
    removed exactly (rank-one maps do not commute), so that is refused rather than approximated."""
    pairs: list[tuple[Tensor, Tensor]] = []

    def pair_id(u: Tensor, v: Tensor) -> int:
        for i, (pu, pv) in enumerate(pairs):
            if torch.equal(pu, u) and torch.equal(pv, v):
                return i
        pairs.append((u, v))
        return len(pairs) - 1

    stacks: dict[tuple[str, int, int], list[WriteMap]] = {}
    order: list[tuple[str, int, int]] = []
    for source in (a, b):
        for m in source.maps:
            pid = pair_id(*source.pairs[m.pair])
            stack = stacks.setdefault(m.writer, [])
            if m.writer not in order:
                order.append(m.writer)
            if stack and stack[-1].pair == pid and abs(stack[-1].alpha * m.alpha - 1.0) <= UNIT_TOLERANCE:
                stack.pop()
                continue
            if any(x.pair == pid and abs(x.alpha * m.alpha - 1.0) <= UNIT_TOLERANCE for x in stack):
                raise InvalidInput("multipliers", f"cannot remove a write map on {m.writer} from under a later "
                                   "one (rank-one maps do not commute); re-apply the remaining edits to the base")
            stack.append(WriteMap(m.site, m.layer, m.head, pid, m.alpha))
    maps = [m for writer in order for m in stacks[writer]]
    used = sorted({m.pair for m in maps})
    renumber = {old: new for new, old in enumerate(used)}
    return [pairs[i] for i in used], [WriteMap(m.site, m.layer, m.head, renumber[m.pair], m.alpha) for m in maps]


def _metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ block of a safetensors buffer (header = 8-byte length + JSON)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__", {}) or {}
