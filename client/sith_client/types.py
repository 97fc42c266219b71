"""What the SDK hands back: the API's own result messages, plus numpy views of tensors.

Results (explanations, search hits, spectra, edit plans, delta and match reports) are the
``sith.v1`` messages themselves, re-exported here under their proto names: their fields are the
schema, documented once in ``proto/sith/v1/*.proto``, with nothing renamed or guessed. Only
tensors get a wrapper (``Embeddings``, ``Classification``, :func:`tensor_to_numpy`), because
numpy is what callers compute with.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from google.protobuf import timestamp_pb2

from sith_api.v1 import adaptation_pb2 as apb
from sith_api.v1 import sith_pb2 as pb

__all__ = [
    "Concept", "Model", "VectorExplanation", "HeadExplanation", "SearchHit", "LayerSpectrum",
    "AffectedVector", "HeadChange", "ConceptEffect", "EditPlan", "Artifact", "DeltaReport", "MatchReport",
    "HeadMatch", "NullDistribution", "LabelAgreement", "MatchAgreement", "SimilarityMatrix", "SimilarityRow",
    "similarity_to_numpy", "EditOp", "Embeddings", "Classification", "JobState", "EditState", "tensor_to_numpy", "numpy_to_tensor",
]

# The API's result messages (see proto/sith/v1/sith.proto and adaptation.proto).
Concept = pb.Concept
Model = pb.Model
VectorExplanation = pb.VectorExplanation
HeadExplanation = pb.HeadExplanation
SearchHit = pb.SearchHit
LayerSpectrum = pb.LayerSpectrum
AffectedVector = pb.AffectedVector
HeadChange = pb.HeadChange
ConceptEffect = pb.ConceptEffect
EditPlan = pb.EditPlan
Artifact = pb.Artifact
DeltaReport = apb.DeltaReport
MatchReport = apb.MatchReport
HeadMatch = apb.HeadMatch
NullDistribution = apb.NullDistribution  # MatchReport.usage_null / label_shuffle_null
LabelAgreement = apb.LabelAgreement  # each field of MatchReport.agreement (a MatchAgreement)
MatchAgreement = apb.MatchAgreement
SimilarityMatrix = apb.SimilarityMatrix  # MatchReport.similarity: rows of SimilarityRow.values
SimilarityRow = apb.SimilarityRow

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "unspecified"]
EditState = Literal["pending", "ready", "failed", "unspecified"]
Action = Literal["suppress", "amplify", "flip", "scale", "debias"]

ACTIONS = {"suppress": pb.EditOperation.SUPPRESS, "amplify": pb.EditOperation.AMPLIFY,
           "flip": pb.EditOperation.FLIP, "scale": pb.EditOperation.SCALE, "debias": pb.EditOperation.DEBIAS}


@dataclass(frozen=True)
class EditOp:
    """One operation of an edit, for when the ``suppress=``/``amplify=`` shortcuts are not enough.

    ``strength`` is α for every action (suppress and debias 0 ≤ α < 1, amplify α > 1, flip α < 0, scale any);
    unset, the library's default. Select vectors with ``top_n``, ``threshold`` on relevance or an
    explicit list of ``vectors`` (layer, head, index); none of them = the planner's choice.
    ``operator`` names the edit operator ("sith_scale", "head_project", ...; default "auto"),
    ``target`` the presence level to reach, ``preserve`` concepts to protect, ``anchor`` the concept
    that takes over part of what a suppress removes ("auto", "none" or a concept name).
    """

    action: Action
    concepts: Sequence[str]
    strength: float | None = None
    layers: Sequence[int] | None = None
    top_n: int | None = None
    threshold: float | None = None
    vectors: Sequence[tuple[int, int, int]] | None = None
    operator: str | None = None
    target: float | None = None
    preserve: Sequence[str] | None = None
    preserve_neighbours: bool | None = None
    anchor: str | None = None

    def to_proto(self) -> pb.EditOperation:
        """The sith.v1.EditOperation; ValueError on a combination the API cannot express."""
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {list(ACTIONS)}, got {self.action!r}")
        concepts = [self.concepts] if isinstance(self.concepts, str) else list(self.concepts)
        op = pb.EditOperation(concepts=concepts, action=ACTIONS[self.action], layers=list(self.layers or ()),
                              operator=self.operator or "", preserve=list(self.preserve or ()),
                              anchor=self.anchor or "")
        if self.strength is not None:
            op.strength = float(self.strength)
        if self.target is not None:
            op.target = float(self.target)
        if self.preserve_neighbours is not None:
            op.preserve_neighbours = bool(self.preserve_neighbours)
        chosen = [x is not None for x in (self.top_n, self.threshold, self.vectors)]
        if sum(chosen) > 1:
            raise ValueError("choose at most one of top_n, threshold, vectors")
        if self.top_n is not None:
            op.select.CopyFrom(pb.Selection(rule=pb.Selection.TOP_N, n=int(self.top_n)))
        elif self.threshold is not None:
            op.select.CopyFrom(pb.Selection(rule=pb.Selection.THRESHOLD, threshold=float(self.threshold)))
        elif self.vectors is not None:
            refs = [pb.VectorRef(layer=layer, head=head, index=index) for layer, head, index in self.vectors]
            op.select.CopyFrom(pb.Selection(rule=pb.Selection.EXPLICIT, vectors=refs))
        return op


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


def tensor_to_numpy(t: pb.Tensor) -> np.ndarray:
    """Decode a little-endian float32 tensor (e.g. ``LayerSpectrum.singular_values``) into an array."""
    if t.dtype not in (pb.Tensor.DTYPE_UNSPECIFIED, pb.Tensor.FLOAT32):
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    arr = np.frombuffer(t.data, dtype="<f4").astype(np.float32, copy=True)
    return arr.reshape(tuple(t.shape)) if t.shape else arr


def similarity_to_numpy(m: apb.SimilarityMatrix) -> np.ndarray:
    """``MatchReport.similarity`` as a float64 ``[len(heads_a), len(heads_b)]`` array (rows: A's heads)."""
    out = np.asarray([list(row.values) for row in m.rows], dtype=np.float64).reshape(len(m.rows), len(m.heads_b))
    if out.shape[0] != len(m.heads_a):
        raise ValueError(f"similarity has {out.shape[0]} rows for {len(m.heads_a)} heads of model A")
    return out


def numpy_to_tensor(a: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return pb.Tensor(shape=list(a.shape), dtype=pb.Tensor.FLOAT32, data=a.tobytes())


def timestamp(t: timestamp_pb2.Timestamp) -> _dt.datetime | None:
    """UTC datetime, or None when the server left the field unset."""
    if t.seconds == 0 and t.nanos == 0:
        return None
    return t.ToDatetime(tzinfo=_dt.timezone.utc)
