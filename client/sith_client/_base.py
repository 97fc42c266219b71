"""What :class:`~sith_client.Client` and :class:`~sith_client.AsyncClient` share (the httpx pattern).

``BaseClient`` holds the configuration (connection, deadline, retry policy) and builds every
request; the two subclasses only send them (blocking or with ``await``) and follow operations.
Every request is checked against the bounds the proto declares (``sith_api.bounds``, the same
check the server runs) before it is sent, so a bad argument fails at once with the same
InvalidArgument (field and reason) the server would give.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import Message

from sith_api import bounds
from sith_api.v1 import adaptation_pb2 as apb
from sith_api.v1 import sith_pb2 as pb

from ._channel import Connection
from ._retry import NO_RETRY, RetryPolicy
from .errors import Unavailable, from_bounds, invalid_argument
from .jobs import Edit, Job
from .types import EditOp, numpy_to_tensor

ImageLike = Any  # bytes (PNG/JPEG), a path, a float32 array [3,H,W] (preprocessed), or a PIL image
Concepts = str | Sequence[str] | None

DEFAULT_TIMEOUT = 30.0
DOWNLOAD_TIMEOUT = 600.0
WATCH_WINDOW = 60.0          # re-open WatchOperation at least this often (server bounds streams too)
POLL_INTERVAL = (0.2, 2.0)   # polling fallback when the server lacks WatchOperation
DOWNLOAD_CHUNK = 8 << 20     # bytes per DownloadEdit message (the channel accepts 16 MiB)
# download(transport=): "auto" = the server's signed HTTP URL when it offers one, else (or when that
# fails part-way) the DownloadEdit stream; "grpc" = the stream only; "http" = fail if HTTP is not offered.
TRANSPORTS = ("auto", "grpc", "http")
# match_heads(profile=): how each head is summarised before matching (sith.v1.HeadProfile).
PROFILES = {"relative-capacity": apb.HEAD_PROFILE_RELATIVE_CAPACITY, "capacity": apb.HEAD_PROFILE_CAPACITY,
            "comp": apb.HEAD_PROFILE_COMP}


def checked(request: Message) -> Message:
    """``request`` if it is within the proto's bounds; else the InvalidArgument the server would raise."""
    try:
        return bounds.check(request)
    except bounds.BoundsError as exc:
        raise from_bounds(exc) from None


def given(message: type[Message], field: str, value: Any, path: str | None = None) -> Any:
    """A value the caller passed explicitly, checked against its bounds even where 0 would mean
    "default" on the wire (so ``k=0`` or ``top_n=0`` is an error, never the default)."""
    if value is not None:
        try:
            bounds.check_value(message, field, value, path)
        except bounds.BoundsError as exc:
            raise from_bounds(exc) from None
    return value


def _concept_list(c: Concepts) -> list[str]:
    if c is None:
        return []
    return [c] if isinstance(c, str) else list(c)


def resource_name(obj: Any) -> str:
    """The name of an Edit/Job handle, or the string itself."""
    return str(getattr(obj, "name", obj))


class BaseClient:
    """Configuration and request building; no I/O."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = RetryPolicy(),
    ) -> None:
        self.connection = Connection.resolve(address, token=token, tls=tls,
                                             root_certificates=root_certificates,  # type: ignore[arg-type]
                                             server_name=server_name)
        self.timeout = timeout
        self.retry = retry or NO_RETRY

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.connection.address}>"

    # ---- analysis -----------------------------------------------------------------------------
    @staticmethod
    def _decompose_request(model: str | None, layers: Sequence[int] | None) -> pb.DecomposeRequest:
        return checked(pb.DecomposeRequest(model=model or "", layers=list(layers or ())))

    @staticmethod
    def _explain_request(model: str | None, layers: Sequence[int] | None, heads: Sequence[int] | None,
                         method: str, k: int | None, coherence: float | None) -> pb.ExplainHeadsRequest:
        req = pb.ExplainHeadsRequest(model=model or "", layers=list(layers or ()), heads=list(heads or ()),
                                     method=method, k=given(pb.ExplainHeadsRequest, "k", k) or 0)
        if coherence is not None:
            req.coherence = coherence
        return checked(req)

    @staticmethod
    def _find_request(concepts: Concepts, model: str | None, layers: Sequence[int] | None,
                      top: int | None) -> pb.FindConceptRequest:
        return checked(pb.FindConceptRequest(model=model or "", concepts=_concept_list(concepts),
                                             layers=list(layers or ()),
                                             top=given(pb.FindConceptRequest, "top", top) or 0))

    @staticmethod
    def _delta_request(base: str, finetuned: str, layers: Sequence[int] | None, directions: int | None,
                       top: int | None, k: int | None, coherence: float | None,
                       testbed_vocabulary: bool) -> apb.AnalyzeDeltaRequest:
        req = apb.AnalyzeDeltaRequest(
            base=base, finetuned=finetuned, layers=list(layers or ()),
            directions=given(apb.AnalyzeDeltaRequest, "directions", directions) or 0,
            top=given(apb.AnalyzeDeltaRequest, "top", top) or 0, k=given(apb.AnalyzeDeltaRequest, "k", k) or 0,
            vocabulary=apb.VOCABULARY_TESTBED if testbed_vocabulary else apb.VOCABULARY_UNSPECIFIED)
        if coherence is not None:
            req.coherence = coherence
        return checked(req)

    @staticmethod
    def _match_request(model_a: str, model_b: str, layers_a: Sequence[int] | None, layers_b: Sequence[int] | None,
                       k: int | None, coherence: float | None, testbed_vocabulary: bool,
                       testbed_categories: bool, profile: str | None = None) -> apb.MatchHeadsRequest:
        if profile is not None and profile not in PROFILES:
            raise invalid_argument("profile", f"expected one of {', '.join(PROFILES)}, got {profile!r}")
        req = apb.MatchHeadsRequest(
            model_a=model_a, model_b=model_b, layers_a=list(layers_a or ()), layers_b=list(layers_b or ()),
            k=given(apb.MatchHeadsRequest, "k", k) or 0, testbed_categories=testbed_categories,
            profile=PROFILES[profile] if profile is not None else apb.HEAD_PROFILE_UNSPECIFIED,
            vocabulary=apb.VOCABULARY_TESTBED if testbed_vocabulary else apb.VOCABULARY_UNSPECIFIED)
        if coherence is not None:
            req.coherence = coherence
        return checked(req)

    # ---- edits --------------------------------------------------------------------------------
    @staticmethod
    def _edit_spec(model: str | None, *, suppress: Concepts = None, amplify: Concepts = None, flip: Concepts = None,
                   scale: Concepts = None, debias: Concepts = None, strength: float | None = None,
                   layers: Sequence[int] | None = None,
                   top_n: int | None = None, threshold: float | None = None, operator: str | None = None,
                   target: float | None = None, preserve: Concepts = None, anchor: str | None = None,
                   operations: Sequence[EditOp] | None = None) -> pb.EditSpec:
        """Each shortcut keyword becomes one operation sharing ``strength`` (α, for every action),
        ``layers``, the selection and the operator; ``operations`` adds fully specified ones."""
        given(pb.Selection, "n", top_n, "top_n")
        given(pb.EditOperation, "strength", strength, "strength")
        given(pb.EditOperation, "target", target, "target")
        ops: list[EditOp] = []
        for action, concepts in (("suppress", suppress), ("amplify", amplify), ("flip", flip), ("scale", scale),
                                 ("debias", debias)):
            names = _concept_list(concepts)
            if names:
                ops.append(EditOp(action, names, strength, layers, top_n, threshold,  # type: ignore[arg-type]
                                  operator=operator, target=target, preserve=_concept_list(preserve) or None,
                                  anchor=anchor))
        ops.extend(operations or ())
        if not ops:
            raise invalid_argument("operations", "an edit needs at least one of suppress=, amplify=, flip=, "
                                   "scale=, debias= or operations=")
        try:
            protos = [op.to_proto() for op in ops]
        except ValueError as exc:
            raise invalid_argument("operations", str(exc)) from None
        return checked(pb.EditSpec(model=model or "", operations=protos, version=1))

    @staticmethod
    def _create_request(spec: pb.EditSpec, request_id: str | None) -> pb.CreateEditRequest:
        """Every create carries an idempotency key (the caller's, or a fresh one), so it is retried safely."""
        return checked(pb.CreateEditRequest(spec=spec, request_id=request_id if request_id is not None
                                            else uuid.uuid4().hex))

    @staticmethod
    def _download_request(name: str, offset: int) -> pb.DownloadEditRequest:
        return checked(pb.DownloadEditRequest(name=name, offset=offset, chunk_bytes=DOWNLOAD_CHUNK))

    @staticmethod
    def _check_transport(transport: str) -> None:
        if transport not in TRANSPORTS:
            raise invalid_argument("transport", f"expected one of {', '.join(TRANSPORTS)}, got {transport!r}")

    def _http_fetch(self, offer: pb.DownloadUrl | None, d: Any, timeout: float, transport: str) -> bool:
        """Fetch ``offer.url`` into ``d``; False (and ``d.written`` bytes kept) when gRPC must finish it,
        which ``transport="http"`` forbids (Unavailable). Blocking: the async client runs it in a thread."""
        from ._http_download import HttpUnavailable, fetch

        if offer is not None and offer.url:
            try:
                fetch(offer.url, d, grpc_address=self.connection.address, filename=offer.artifact.filename,
                      size=offer.artifact.size_bytes, sha256=offer.artifact.sha256, timeout=timeout,
                      root_certificates=self.connection.root_certificates, server_name=self.connection.server_name)
                return True
            except HttpUnavailable:
                pass
        if transport == "http":
            raise Unavailable("the server offers no HTTP download for this edit (or it failed); "
                              "use transport='auto' or 'grpc'")
        return False

    # ---- embeddings ---------------------------------------------------------------------------
    @staticmethod
    def _model_ref(model: str | None, edit: Any) -> pb.ModelRef | None:
        if edit is not None:
            return pb.ModelRef(edit=resource_name(edit))
        return pb.ModelRef(model=model) if model else None

    def _embed_texts_request(self, texts: str | Sequence[str], model: str | None, edit: Any,
                             normalize: bool) -> pb.EmbedTextsRequest:
        if edit is not None:
            raise invalid_argument("edit", "edits change only the vision tower, so an edited model's text "
                                   "embeddings are its base model's: pass model= (or nothing) instead")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return checked(pb.EmbedTextsRequest(target=self._model_ref(model, None), texts=texts, normalize=normalize))

    def _embed_images_request(self, images: ImageLike | Iterable[ImageLike], model: str | None, edit: Any,
                              normalize: bool) -> pb.EmbedImagesRequest:
        return checked(pb.EmbedImagesRequest(target=self._model_ref(model, edit), images=images_to_proto(images),
                                             normalize=normalize))

    def _classify_request(self, images: ImageLike | Iterable[ImageLike], labels: Sequence[str], model: str | None,
                          edit: Any, template: str) -> pb.ClassifyRequest:
        return checked(pb.ClassifyRequest(target=self._model_ref(model, edit), images=images_to_proto(images),
                                          labels=list(labels), template=template))

    # ---- handles ------------------------------------------------------------------------------
    @staticmethod
    def _job(op: pb.Operation, result_type: type[Message] | None = None) -> Job:
        return Job(op, result_type)

    @staticmethod
    def _edit(message: pb.Edit) -> Edit:
        return Edit(message)


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
            raise invalid_argument("images", f"a preprocessed image must be [3, H, W], got shape {list(x.shape)}")
        return pb.Image(tensor=numpy_to_tensor(x))
    if hasattr(x, "save"):  # PIL image, without importing PIL
        buf = io.BytesIO()
        x.save(buf, format="PNG")
        return pb.Image(encoded=buf.getvalue())
    if hasattr(x, "numpy"):  # a torch tensor, without importing torch
        return _image(np.asarray(x.detach().cpu().numpy()))
    raise invalid_argument("images", f"cannot send {type(x).__name__} as an image")
