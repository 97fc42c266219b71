"""Typed, immutable results: what the SDK hands back instead of protobuf messages.

Job results travel as ``google.protobuf.Struct`` (JSON-like; every number is a double), so the
parsers here restore ints, tuples and numpy arrays, and tolerate the two shapes a (concept, score)
pair can take in JSON: ``["red", 0.4]`` or ``{"concept": "red", "score": 0.4}``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from .v1 import sith_pb2 as pb

__all__ = [
    "Concept",
    "ModelInfo",
    "VectorExplanation",
    "HeadExplanation",
    "SearchHit",
    "LayerSpectrum",
    "AffectedVector",
    "HeadChange",
    "EditPreview",
    "EditOp",
    "Embeddings",
    "Classification",
    "JobState",
    "EditState",
]

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "unspecified"]
EditState = Literal["pending", "ready", "failed", "unspecified"]
Action = Literal["suppress", "amplify", "flip", "scale"]


class Concept(NamedTuple):
    """A dictionary concept and its weight (COMP coefficient, relevance or theme score)."""

    name: str
    score: float


@dataclass(frozen=True)
class ModelInfo:
    """A model the server can analyse, edit and embed with; ``hash`` is accepted wherever a name is."""

    name: str
    hash: str
    layers: int
    heads: int
    width: int
    head_dim: int
    output_dim: int
    image_size: int
    is_default: bool = False

    @classmethod
    def from_proto(cls, m: pb.Model) -> ModelInfo:
        return cls(m.name, m.hash, m.layers, m.heads, m.width, m.head_dim, m.output_dim,
                   m.image_size, m.is_default)


@dataclass(frozen=True)
class VectorExplanation:
    """One singular vector (``layer``, ``head``, ``index``) explained as a sparse concept mix."""

    layer: int
    head: int
    index: int
    sigma: float
    concepts: tuple[Concept, ...]
    fidelity: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VectorExplanation:
        fid = d.get("fidelity")
        return cls(_i(d["layer"]), _i(d["head"]), _i(d["index"]), float(d.get("sigma", 0.0)),
                   _concepts(d.get("concepts", ())), None if fid is None else float(fid))


@dataclass(frozen=True)
class HeadExplanation:
    """A head's explained singular vectors (by descending sigma) and its overall theme."""

    layer: int
    head: int
    vectors: tuple[VectorExplanation, ...]
    theme: tuple[Concept, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadExplanation:
        layer, head = _i(d["layer"]), _i(d["head"])
        vectors = tuple(
            VectorExplanation.from_dict({"layer": layer, "head": head, **v}) for v in d.get("vectors", ())
        )
        return cls(layer, head, vectors, _concepts(d.get("theme", ())))


@dataclass(frozen=True)
class SearchHit:
    """A singular vector that aligns with the searched concepts (``score`` is the alignment)."""

    layer: int
    head: int
    index: int
    score: float
    sigma: float
    concepts: tuple[Concept, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchHit:
        return cls(_i(d["layer"]), _i(d["head"]), _i(d["index"]), float(d.get("score", 0.0)),
                   float(d.get("sigma", 0.0)), _concepts(d.get("concepts", ())))


@dataclass(frozen=True)
class LayerSpectrum:
    """Singular values of every head of one layer, ``[heads, rank]``."""

    layer: int
    singular_values: np.ndarray

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSpectrum:
        return cls(_i(d["layer"]), np.asarray(d.get("singular_values", []), dtype=np.float32))


@dataclass(frozen=True)
class AffectedVector:
    """A singular vector an edit rescales: ``alpha`` is its new multiplier (1 = unchanged);
    ``operation`` indexes the edit operation that selected it."""

    layer: int
    head: int
    index: int
    alpha: float
    relevance: float | None = None
    sigma: float | None = None
    operation: int = 0
    concepts: tuple[Concept, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AffectedVector:
        rel, sigma = d.get("relevance", d.get("score")), d.get("sigma")
        return cls(_i(d["layer"]), _i(d["head"]), _i(d["index"]),
                   float(d.get("alpha", d.get("multiplier", 1.0))),
                   None if rel is None else float(rel), None if sigma is None else float(sigma),
                   _i(d.get("operation", 0)), _concepts(d.get("concepts", ())))


@dataclass(frozen=True)
class HeadChange:
    """A head's spectral energy (sum of squared singular values) before and after the edit."""

    layer: int
    head: int
    vectors: int
    energy_before: float
    energy_after: float

    @property
    def energy_ratio(self) -> float:
        return self.energy_after / self.energy_before if self.energy_before > 0 else 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadChange:
        return cls(_i(d["layer"]), _i(d["head"]), _i(d.get("vectors", 0)),
                   float(d.get("energy_before", 0.0)), float(d.get("energy_after", 0.0)))


@dataclass(frozen=True)
class EditPreview:
    """What an edit does (or would do, for a dry run): which vectors it rescales and how much of
    each head's energy survives. ``plan`` is the server's full plan document (concept alignment,
    notes, …); the fields are its typed core."""

    affected: tuple[AffectedVector, ...]
    head_changes: tuple[HeadChange, ...] = ()
    notes: tuple[str, ...] = ()
    plan: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditPreview:
        return cls(tuple(AffectedVector.from_dict(v) for v in d.get("affected", ())),
                   tuple(HeadChange.from_dict(h) for h in d.get("heads", ())),
                   tuple(str(n) for n in d.get("notes", ())), dict(d))

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Distinct (layer, head) pairs touched, in order."""
        return list(dict.fromkeys((v.layer, v.head) for v in self.affected))


@dataclass(frozen=True)
class EditOp:
    """One operation of an edit, for when ``suppress=``/``amplify=`` shortcuts are not enough.

    Select vectors by ``top_n`` (default 8 on the server), ``threshold`` on relevance, or an
    explicit list of ``vectors`` as (layer, head, index).
    """

    action: Action
    concepts: Sequence[str]
    strength: float | None = None
    layers: Sequence[int] | None = None
    top_n: int | None = None
    threshold: float | None = None
    vectors: Sequence[tuple[int, int, int]] | None = None

    def to_proto(self) -> pb.EditOperation:
        concepts = [self.concepts] if isinstance(self.concepts, str) else list(self.concepts)
        op = pb.EditOperation(concepts=concepts, action=_ACTIONS[self.action],
                              layers=list(self.layers or ()))
        if self.strength is not None:
            op.strength = float(self.strength)
        chosen = [x is not None for x in (self.top_n, self.threshold, self.vectors)]
        if sum(chosen) > 1:
            raise ValueError("choose at most one of top_n, threshold, vectors")
        if self.top_n is not None:
            op.select.CopyFrom(pb.Selection(rule=pb.Selection.TOP_N, n=int(self.top_n)))
        elif self.threshold is not None:
            op.select.CopyFrom(pb.Selection(rule=pb.Selection.THRESHOLD, threshold=float(self.threshold)))
        elif self.vectors is not None:
            refs = [pb.VectorRef(layer=l, head=h, index=i) for l, h, i in self.vectors]
            op.select.CopyFrom(pb.Selection(rule=pb.Selection.EXPLICIT, vectors=refs))
        return op

    @classmethod
    def from_proto(cls, op: pb.EditOperation) -> EditOp:
        has_select = op.HasField("select")
        sel, rule = op.select, op.select.rule
        return cls(
            action=pb.EditOperation.Action.Name(op.action).lower(),  # type: ignore[arg-type]
            concepts=tuple(op.concepts),
            strength=op.strength if op.HasField("strength") else None,
            layers=tuple(op.layers) or None,
            top_n=sel.n if has_select and rule in (pb.Selection.TOP_N, pb.Selection.RULE_UNSPECIFIED) else None,
            threshold=sel.threshold if has_select and rule == pb.Selection.THRESHOLD else None,
            vectors=(tuple((v.layer, v.head, v.index) for v in sel.vectors)
                     if has_select and rule == pb.Selection.EXPLICIT else None),
        )


_ACTIONS = {
    "suppress": pb.EditOperation.SUPPRESS,
    "amplify": pb.EditOperation.AMPLIFY,
    "flip": pb.EditOperation.FLIP,
    "scale": pb.EditOperation.SCALE,
}


@dataclass(frozen=True)
class Embeddings:
    """Embeddings as a float32 ``[N, D]`` numpy array; ``np.asarray(emb)`` works directly."""

    vectors: np.ndarray
    model_hash: str

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.vectors if dtype is None else self.vectors.astype(dtype)

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, i: Any) -> np.ndarray:
        return self.vectors[i]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.vectors.shape

    @classmethod
    def from_proto(cls, r: pb.EmbedResponse) -> Embeddings:
        return cls(tensor_to_numpy(r.embeddings), r.model_hash)


@dataclass(frozen=True)
class Classification:
    """Zero-shot classification: ``probabilities`` ``[N, len(labels)]`` and the argmax labels."""

    probabilities: np.ndarray
    predicted: tuple[str, ...]
    labels: tuple[str, ...]

    @classmethod
    def from_proto(cls, r: pb.ClassifyResponse, labels: Sequence[str]) -> Classification:
        return cls(tensor_to_numpy(r.probabilities), tuple(r.predicted), tuple(labels))


# --- helpers -----------------------------------------------------------------------------------


def tensor_to_numpy(t: pb.Tensor) -> np.ndarray:
    """Decode a little-endian float32 tensor into a writable array of its shape."""
    if t.dtype not in (pb.Tensor.DTYPE_UNSPECIFIED, pb.Tensor.FLOAT32):
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    arr = np.frombuffer(t.data, dtype="<f4").astype(np.float32, copy=True)
    return arr.reshape(tuple(t.shape)) if t.shape else arr


def numpy_to_tensor(a: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return pb.Tensor(shape=list(a.shape), dtype=pb.Tensor.FLOAT32, data=a.tobytes())


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(s)


def timestamp(t: timestamp_pb2.Timestamp) -> _dt.datetime | None:
    """UTC datetime, or None when the server left the field unset."""
    if t.seconds == 0 and t.nanos == 0:
        return None
    return t.ToDatetime(tzinfo=_dt.timezone.utc)


def _i(x: Any) -> int:
    return int(round(float(x)))


def _concepts(items: Any) -> tuple[Concept, ...]:
    out = []
    for c in items or ():
        if isinstance(c, Mapping):
            name = c.get("concept", c.get("name", ""))
            score = c.get("score", c.get("weight", c.get("coefficient", 0.0)))
        elif isinstance(c, str):
            name, score = c, 0.0
        else:
            name, score = c[0], c[1]
        out.append(Concept(str(name), float(score)))
    return tuple(out)
