"""The synchronous client.

    with sith_client.Client("localhost:50051") as c:
        heads = c.explain(layers=[-1], k=5)
        c.edit(suppress=["red"]).wait(progress=True).download("red-free.safetensors")
        vecs = c.embed_texts(["a red square"]).vectors          # numpy [1, D]

Every call has a deadline (``timeout``, seconds) and is retried with jittered exponential backoff
on UNAVAILABLE, except ``edit()``, which creates a resource and so is sent exactly once.
Failures raise :mod:`sith_client.errors` exceptions, never raw ``grpc.RpcError``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import grpc

from . import _requests as rq
from ._channel import Connection
from ._download import AtomicDownload
from ._retry import NO_RETRY, RetryPolicy, call_with_retry
from .errors import DeadlineExceeded, from_rpc_error
from .jobs import Edit, Job
from .types import (
    Classification,
    EditOp,
    EditPreview,
    Embeddings,
    HeadExplanation,
    LayerSpectrum,
    ModelInfo,
    SearchHit,
)
from .v1 import sith_pb2 as pb
from .v1 import sith_pb2_grpc as rpc

T = TypeVar("T")

__all__ = ["Client"]

DEFAULT_TIMEOUT = 30.0
DOWNLOAD_TIMEOUT = 600.0
WATCH_WINDOW = 60.0          # re-open WatchOperation at least this often (server bounds streams too)
POLL_INTERVAL = (0.2, 2.0)   # polling fallback when the server lacks WatchOperation


class Client:
    """A connection to a SITH server. Thread-safe; use one per process and close it (or ``with``).

    ``address`` defaults to ``$SITH_ADDRESS`` or ``localhost:50051``; ``token`` to ``$SITH_TOKEN``.
    TLS is on when ``tls=True`` (system roots) or ``root_certificates`` (PEM bytes or a path) is set.
    ``retry=None`` disables retries.
    """

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
        self.connection = Connection.resolve(
            address, token=token, tls=tls, root_certificates=root_certificates, server_name=server_name  # type: ignore[arg-type]
        )
        self.timeout = timeout
        self.retry = retry or NO_RETRY
        self._channel = self.connection.channel()
        self._models = rpc.ModelsStub(self._channel)
        self._analysis = rpc.AnalysisStub(self._channel)
        self._edits = rpc.EditsStub(self._channel)
        self._embeddings = rpc.EmbeddingsStub(self._channel)
        self._operations = rpc.OperationsStub(self._channel)

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.connection.address}>"

    def _call(self, method: Callable[..., T], request: Any, *, idempotent: bool = True,
              timeout: float | None = None) -> T:
        md = self.connection.metadata
        t = timeout or self.timeout
        return call_with_retry(lambda: method(request, timeout=t, metadata=md), self.retry, idempotent=idempotent)

    # --- models ------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Models the server has loaded (the default one has ``is_default``)."""
        r = self._call(self._models.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_proto(m) for m in r.models]

    def model(self, name: str = "") -> ModelInfo:
        """One model by name or hash (empty = the default model)."""
        return ModelInfo.from_proto(self._call(self._models.GetModel, pb.GetModelRequest(model=name)))

    # --- analysis (long-running) -------------------------------------------------------------

    def _job(self, op: pb.Operation, parse: Callable[[dict[str, Any]], T], wait: bool,
             timeout: float | None, progress: Any) -> T | Job[T]:
        job = Job(self, op, parse)
        return job.result(timeout=timeout, progress=progress) if wait else job

    @overload
    def decompose(self, model: str | None = ..., *, layers: Sequence[int] | None = ...,
                  wait: Literal[True] = ..., timeout: float | None = ..., progress: Any = ...) -> list[LayerSpectrum]: ...
    @overload
    def decompose(self, model: str | None = ..., *, layers: Sequence[int] | None = ...,
                  wait: Literal[False], timeout: float | None = ..., progress: Any = ...) -> Job[list[LayerSpectrum]]: ...
    def decompose(self, model=None, *, layers=None, wait=True, timeout=None, progress=False):  # type: ignore[no-untyped-def]
        """Per-head singular values of ``layers`` (default: the last four)."""
        op = self._call(self._analysis.Decompose, pb.DecomposeRequest(model=model or "", layers=list(layers or ())))
        return self._job(op, rq.parse_decompose, wait, timeout, progress)

    @overload
    def explain(self, model: str | None = ..., *, layers: Sequence[int] | None = ..., heads: Sequence[int] | None = ...,
                method: str = ..., k: int = ..., coherence: float | None = ..., wait: Literal[True] = ...,
                timeout: float | None = ..., progress: Any = ...) -> list[HeadExplanation]: ...
    @overload
    def explain(self, model: str | None = ..., *, layers: Sequence[int] | None = ..., heads: Sequence[int] | None = ...,
                method: str = ..., k: int = ..., coherence: float | None = ..., wait: Literal[False],
                timeout: float | None = ..., progress: Any = ...) -> Job[list[HeadExplanation]]: ...
    def explain(self, model=None, *, layers=None, heads=None, method="comp", k=5, coherence=None,  # type: ignore[no-untyped-def]
                wait=True, timeout=None, progress=False):
        """Explain each head's singular vectors as sparse concept mixes (COMP by default)."""
        req = rq.explain_request(model, layers, heads, method, k, coherence)
        return self._job(self._call(self._analysis.ExplainHeads, req), rq.parse_explain, wait, timeout, progress)

    @overload
    def find(self, concepts: str | Sequence[str], *, model: str | None = ..., layers: Sequence[int] | None = ...,
             top: int = ..., wait: Literal[True] = ..., timeout: float | None = ..., progress: Any = ...) -> list[SearchHit]: ...
    @overload
    def find(self, concepts: str | Sequence[str], *, model: str | None = ..., layers: Sequence[int] | None = ...,
             top: int = ..., wait: Literal[False], timeout: float | None = ..., progress: Any = ...) -> Job[list[SearchHit]]: ...
    def find(self, concepts, *, model=None, layers=None, top=20, wait=True, timeout=None, progress=False):  # type: ignore[no-untyped-def]
        """Singular vectors that best match ``concepts``, best first."""
        req = rq.find_request(concepts, model, layers, top)
        return self._job(self._call(self._analysis.FindConcept, req), rq.parse_find, wait, timeout, progress)

    def job(self, name: str) -> Job[dict[str, Any]]:
        """Re-attach to an operation by name ("operations/{id}"); its result is the raw document."""
        return Job(self, self._get_operation(name), rq.parse_raw)

    # --- edits -------------------------------------------------------------------------------

    def preview_edit(self, model: str | None = None, *, suppress: rq.Concepts = None, amplify: rq.Concepts = None,
                     flip: rq.Concepts = None, scale: rq.Concepts = None, strength: float | None = None,
                     layers: Sequence[int] | None = None, top_n: int | None = None, threshold: float | None = None,
                     operations: Sequence[EditOp] | None = None, timeout: float | None = None,
                     progress: Any = False) -> EditPreview:
        """Dry run: which singular vectors the edit would rescale, stored nowhere."""
        spec = rq.edit_spec(model, suppress=suppress, amplify=amplify, flip=flip, scale=scale, strength=strength,
                            layers=layers, top_n=top_n, threshold=threshold, operations=operations)
        op = self._call(self._edits.PreviewEdit, pb.PreviewEditRequest(spec=spec))
        return Job(self, op, rq.parse_preview).result(timeout=timeout, progress=progress)

    def edit(self, model: str | None = None, *, suppress: rq.Concepts = None, amplify: rq.Concepts = None,
             flip: rq.Concepts = None, scale: rq.Concepts = None, strength: float | None = None,
             layers: Sequence[int] | None = None, top_n: int | None = None, threshold: float | None = None,
             operations: Sequence[EditOp] | None = None, request_id: str | None = None) -> Edit:
        """Create (plan and store) an edit; returns at once with ``state == "pending"``.

        Retried like any read: every call carries an idempotency key (``request_id``, a fresh one by
        default), so a retry after a lost response returns the edit the first attempt created.
        Pass your own key to make a create safe to repeat across processes.
        """
        spec = rq.edit_spec(model, suppress=suppress, amplify=amplify, flip=flip, scale=scale, strength=strength,
                            layers=layers, top_n=top_n, threshold=threshold, operations=operations)
        request = pb.CreateEditRequest(spec=spec, request_id=rq.request_id(request_id))
        return Edit(self, self._call(self._edits.CreateEdit, request))

    def get_edit(self, name: str) -> Edit:
        return Edit(self, self._get_edit_proto(name))

    def edits(self, *, page_size: int = 0) -> Iterator[Edit]:
        """Every edit of this tenant, newest pages fetched lazily."""
        token = ""
        while True:
            r = self._call(self._edits.ListEdits, pb.ListEditsRequest(page_size=page_size, page_token=token))
            for e in r.edits:
                yield Edit(self, e)
            token = r.next_page_token
            if not token:
                return

    def delete_edit(self, edit: Edit | str) -> None:
        self._call(self._edits.DeleteEdit, pb.DeleteEditRequest(name=rq.resource_name(edit)))

    def download(self, edit: Edit | str, path: str | os.PathLike[str], *, overwrite: bool = True,
                 timeout: float = DOWNLOAD_TIMEOUT) -> Path:
        """Stream the edited checkpoint (safetensors, open_clip layout) to ``path``.

        The sha256 announced by the server is checked before the file is atomically renamed into
        place; ``path`` may be a directory. A dropped stream is retried from the last byte received.
        """
        name = rq.resource_name(edit)
        md = self.connection.metadata
        with AtomicDownload(path, overwrite=overwrite) as d:
            def once() -> Path:
                req = pb.DownloadEditRequest(name=name, offset=d.written)
                for chunk in self._edits.DownloadEdit(req, timeout=timeout, metadata=md):
                    if chunk.sha256:
                        d.begin(filename=chunk.filename, total_bytes=chunk.total_bytes, sha256=chunk.sha256)
                    d.write(chunk.data, chunk.offset)
                return d.commit()

            return call_with_retry(once, self.retry)

    def _get_edit_proto(self, name: str) -> pb.Edit:
        return self._call(self._edits.GetEdit, pb.GetEditRequest(name=name))

    # --- embeddings --------------------------------------------------------------------------

    def embed_texts(self, texts: str | Sequence[str], *, model: str | None = None, edit: Edit | str | None = None,
                    normalize: bool = True) -> Embeddings:
        """Text embeddings ``[N, D]`` from a base model or an edited one (``edit=``)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        req = pb.EmbedTextsRequest(target=rq.model_ref(model, edit), texts=texts, normalize=normalize)
        return Embeddings.from_proto(self._call(self._embeddings.EmbedTexts, req))

    def embed_images(self, images: rq.ImageLike | Iterable[rq.ImageLike], *, model: str | None = None,
                     edit: Edit | str | None = None, normalize: bool = True) -> Embeddings:
        """Image embeddings ``[N, D]``. Images are encoded files (bytes or paths, preprocessed by
        the server) or float32 arrays already preprocessed with the model's transform."""
        req = pb.EmbedImagesRequest(target=rq.model_ref(model, edit), images=rq.images_to_proto(images),
                                    normalize=normalize)
        return Embeddings.from_proto(self._call(self._embeddings.EmbedImages, req))

    def classify(self, images: rq.ImageLike | Iterable[rq.ImageLike], labels: Sequence[str], *,
                 model: str | None = None, edit: Edit | str | None = None, template: str = "") -> Classification:
        """Zero-shot classification of ``images`` over ``labels``."""
        req = pb.ClassifyRequest(target=rq.model_ref(model, edit), images=rq.images_to_proto(images),
                                 labels=list(labels), template=template)
        return Classification.from_proto(self._call(self._embeddings.Classify, req), labels)

    # --- operations (used by Job/Edit) -------------------------------------------------------

    def _get_operation(self, name: str) -> pb.Operation:
        return self._call(self._operations.GetOperation, pb.GetOperationRequest(name=name))

    def _cancel_operation(self, name: str) -> pb.Operation:
        return self._call(self._operations.CancelOperation, pb.CancelOperationRequest(name=name))

    def _wait_operation(self, name: str, timeout: float | None, on_update: Callable[[pb.Operation], None]) -> pb.Operation:
        """Follow ``WatchOperation`` until done, re-opening the stream when it ends or drops."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retry.delays()
        while True:
            window = _remaining(deadline, name, timeout)
            try:
                stream = self._operations.WatchOperation(
                    pb.WatchOperationRequest(name=name), timeout=min(window, WATCH_WINDOW),
                    metadata=self.connection.metadata)
                for op in stream:
                    delays = self.retry.delays()   # healthy again: fresh retry budget
                    on_update(op)
                    if op.done:
                        stream.cancel()
                        return op
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return self._poll_operation(name, deadline, timeout, on_update)
                if self.retry.retryable(err):
                    delay = next(delays, None)
                    if delay is not None:
                        time.sleep(delay)
                        continue
                raise from_rpc_error(err) from None

    def _poll_operation(self, name: str, deadline: float | None, timeout: float | None,
                        on_update: Callable[[pb.Operation], None]) -> pb.Operation:
        interval = POLL_INTERVAL[0]
        while True:
            op = self._get_operation(name)
            on_update(op)
            if op.done:
                return op
            time.sleep(min(interval, _remaining(deadline, name, timeout)))
            interval = min(interval * 1.5, POLL_INTERVAL[1])


def _remaining(deadline: float | None, name: str, timeout: float | None) -> float:
    if deadline is None:
        return WATCH_WINDOW
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"operation {name} not done after {timeout:g}s (it keeps running; cancel it or wait again)")
    return left
