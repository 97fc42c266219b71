"""Request builders and response parsers shared by the sync and asyncio clients.

Keeping them here means ``Client`` and ``AsyncClient`` differ only in how they *call*, never in
what they send or how they read the answer.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from .types import (
    EditOp,
    EditPreview,
    HeadExplanation,
    LayerSpectrum,
    SearchHit,
    numpy_to_tensor,
    struct_to_dict,
)
from .v1 import sith_pb2 as pb

ImageLike = Any  # bytes (PNG/JPEG), a path, a float32 array [3,H,W] (preprocessed), or a PIL image
Concepts = str | Sequence[str] | None


def model_ref(model: str | None = None, edit: Any = None) -> pb.ModelRef | None:
    """``edit`` wins: it may be an Edit object, "edits/{id}" or a bare id."""
    if edit is not None:
        name = getattr(edit, "name", edit)
        return pb.ModelRef(edit=str(name))
    if model:
        return pb.ModelRef(model=model)
    return None


def resource_name(obj: Any) -> str:
    """The name of an Edit/Job object, or the string itself."""
    return str(getattr(obj, "name", obj))


def images_to_proto(images: ImageLike | Iterable[ImageLike]) -> list[pb.Image]:
    """Accept one image or many; a 4-D array is a batch of preprocessed images."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [pb.Image(tensor=numpy_to_tensor(x)) for x in images]
        return [_image(images)]
    if isinstance(images, (bytes, bytearray, str, os.PathLike)) or hasattr(images, "save"):
        return [_image(images)]
    return [_image(x) for x in images]


def _image(x: ImageLike) -> pb.Image:
    if isinstance(x, (bytes, bytearray)):
        return pb.Image(encoded=bytes(x))
    if isinstance(x, (str, os.PathLike)):
        return pb.Image(encoded=Path(x).expanduser().read_bytes())
    if isinstance(x, np.ndarray):
        if x.ndim != 3:
            raise ValueError(f"a preprocessed image must be [3, H, W], got shape {x.shape}")
        return pb.Image(tensor=numpy_to_tensor(x))
    if hasattr(x, "save"):  # PIL image, without importing PIL
        buf = io.BytesIO()
        x.save(buf, format="PNG")
        return pb.Image(encoded=buf.getvalue())
    if hasattr(x, "numpy"):  # a torch tensor, without importing torch
        return _image(np.asarray(x.detach().cpu().numpy()))
    raise TypeError(f"cannot send {type(x).__name__} as an image")


def _concept_list(c: Concepts) -> list[str]:
    if c is None:
        return []
    return [c] if isinstance(c, str) else list(c)


def request_id(given: str | None) -> str:
    """An idempotency key for a create: the caller's, or a fresh random one."""
    return given if given is not None else uuid.uuid4().hex


def edit_spec(
    model: str | None,
    *,
    suppress: Concepts = None,
    amplify: Concepts = None,
    flip: Concepts = None,
    scale: Concepts = None,
    strength: float | None = None,
    layers: Sequence[int] | None = None,
    top_n: int | None = None,
    threshold: float | None = None,
    operations: Sequence[EditOp] | None = None,
) -> pb.EditSpec:
    """The shortcut keywords each become one operation sharing ``layers`` and the selection;
    ``strength`` applies to ``amplify``/``scale``; ``operations`` adds fully specified ones."""
    ops: list[EditOp] = []
    for action, concepts in (("suppress", suppress), ("amplify", amplify), ("flip", flip), ("scale", scale)):
        names = _concept_list(concepts)
        if names:
            s = strength if action in ("amplify", "scale") else None
            ops.append(EditOp(action, names, s, layers, top_n, threshold))  # type: ignore[arg-type]
    ops.extend(operations or ())
    if not ops:
        raise ValueError("an edit needs at least one of suppress=, amplify=, flip=, scale= or operations=")
    return pb.EditSpec(model=model or "", operations=[op.to_proto() for op in ops], version=1)


def explain_request(model: str | None, layers: Sequence[int] | None, heads: Sequence[int] | None,
                    method: str, k: int, coherence: float | None) -> pb.ExplainHeadsRequest:
    req = pb.ExplainHeadsRequest(model=model or "", layers=list(layers or ()), heads=list(heads or ()),
                                 method=method, k=k)
    if coherence is not None:
        req.coherence = coherence
    return req


def find_request(concepts: Concepts, model: str | None, layers: Sequence[int] | None, top: int) -> pb.FindConceptRequest:
    return pb.FindConceptRequest(model=model or "", concepts=_concept_list(concepts),
                                 layers=list(layers or ()), top=top)


def operation_result(op: pb.Operation) -> dict[str, Any]:
    """The job's result document (a Struct packed in ``Operation.response``)."""
    if not op.HasField("response"):
        return {}
    s = struct_pb2.Struct()
    if not op.response.Unpack(s):
        raise ValueError(f"operation {op.name} returned {op.response.type_url}, not a Struct")
    return struct_to_dict(s)


# Parsers of job results, one per job kind.


def parse_explain(d: dict[str, Any]) -> list[HeadExplanation]:
    return [HeadExplanation.from_dict(h) for h in d.get("heads", ())]


def parse_find(d: dict[str, Any]) -> list[SearchHit]:
    return [SearchHit.from_dict(h) for h in d.get("hits", ())]


def parse_decompose(d: dict[str, Any]) -> list[LayerSpectrum]:
    return [LayerSpectrum.from_dict(x) for x in d.get("layers", ())]


def parse_preview(d: dict[str, Any]) -> EditPreview:
    return EditPreview.from_dict(d.get("plan", d))


def parse_raw(d: dict[str, Any]) -> dict[str, Any]:
    return d
