"""The asyncio client: the same API as :class:`~sith_client.Client`, with coroutines.

    async with sith_client.AsyncClient() as c:
        edit = await c.edit(suppress=["red"])
        await (await edit.wait()).download("out.safetensors")
        embs = await asyncio.gather(*(c.embed_texts(t) for t in texts))
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from . import _requests as rq
from ._channel import Connection
from ._download import AtomicDownload
from ._retry import NO_RETRY, RetryPolicy, acall_with_retry
from .client import DEFAULT_TIMEOUT, DOWNLOAD_TIMEOUT, POLL_INTERVAL, WATCH_WINDOW, _remaining
from .errors import from_rpc_error
from .jobs import AsyncEdit, AsyncJob
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

__all__ = ["AsyncClient"]


class AsyncClient:
    """Asyncio connection to a SITH server; create it inside the event loop that uses it.

    Analysis methods take ``wait=False`` to return an :class:`AsyncJob` instead of the result.
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
        self._channel = self.connection.aio_channel()
        self._models = rpc.ModelsStub(self._channel)
        self._analysis = rpc.AnalysisStub(self._channel)
        self._edits = rpc.EditsStub(self._channel)
        self._embeddings = rpc.EmbeddingsStub(self._channel)
        self._operations = rpc.OperationsStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncClient {self.connection.address}>"

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, *, idempotent: bool = True,
                    timeout: float | None = None) -> T:
        md = self.connection.metadata
        t = timeout or self.timeout
        return await acall_with_retry(lambda: method(request, timeout=t, metadata=md), self.retry,
                                      idempotent=idempotent)

    # --- models ------------------------------------------------------------------------------

    async def models(self) -> list[ModelInfo]:
        r = await self._call(self._models.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_proto(m) for m in r.models]

    async def model(self, name: str = "") -> ModelInfo:
        return ModelInfo.from_proto(await self._call(self._models.GetModel, pb.GetModelRequest(model=name)))

    # --- analysis ----------------------------------------------------------------------------

    async def _job(self, op: pb.Operation, parse: Callable[[dict[str, Any]], T], wait: bool,
                   timeout: float | None, progress: Any) -> Any:
        job = AsyncJob(self, op, parse)
        return await job.result(timeout=timeout, progress=progress) if wait else job

    async def decompose(self, model: str | None = None, *, layers: Sequence[int] | None = None, wait: bool = True,
                        timeout: float | None = None, progress: Any = False) -> list[LayerSpectrum] | AsyncJob[list[LayerSpectrum]]:
        op = await self._call(self._analysis.Decompose, pb.DecomposeRequest(model=model or "", layers=list(layers or ())))
        return await self._job(op, rq.parse_decompose, wait, timeout, progress)

    async def explain(self, model: str | None = None, *, layers: Sequence[int] | None = None,
                      heads: Sequence[int] | None = None, method: str = "comp", k: int = 5,
                      coherence: float | None = None, wait: bool = True, timeout: float | None = None,
                      progress: Any = False) -> list[HeadExplanation] | AsyncJob[list[HeadExplanation]]:
        req = rq.explain_request(model, layers, heads, method, k, coherence)
        return await self._job(await self._call(self._analysis.ExplainHeads, req), rq.parse_explain, wait, timeout, progress)

    async def find(self, concepts: str | Sequence[str], *, model: str | None = None, layers: Sequence[int] | None = None,
                   top: int = 20, wait: bool = True, timeout: float | None = None,
                   progress: Any = False) -> list[SearchHit] | AsyncJob[list[SearchHit]]:
        req = rq.find_request(concepts, model, layers, top)
        return await self._job(await self._call(self._analysis.FindConcept, req), rq.parse_find, wait, timeout, progress)

    async def job(self, name: str) -> AsyncJob[dict[str, Any]]:
        return AsyncJob(self, await self._get_operation(name), rq.parse_raw)

    # --- edits -------------------------------------------------------------------------------

    async def preview_edit(self, model: str | None = None, *, suppress: rq.Concepts = None, amplify: rq.Concepts = None,
                           flip: rq.Concepts = None, scale: rq.Concepts = None, strength: float | None = None,
                           layers: Sequence[int] | None = None, top_n: int | None = None,
                           threshold: float | None = None, operations: Sequence[EditOp] | None = None,
                           timeout: float | None = None, progress: Any = False) -> EditPreview:
        spec = rq.edit_spec(model, suppress=suppress, amplify=amplify, flip=flip, scale=scale, strength=strength,
                            layers=layers, top_n=top_n, threshold=threshold, operations=operations)
        op = await self._call(self._edits.PreviewEdit, pb.PreviewEditRequest(spec=spec))
        return await AsyncJob(self, op, rq.parse_preview).result(timeout=timeout, progress=progress)

    async def edit(self, model: str | None = None, *, suppress: rq.Concepts = None, amplify: rq.Concepts = None,
                   flip: rq.Concepts = None, scale: rq.Concepts = None, strength: float | None = None,
                   layers: Sequence[int] | None = None, top_n: int | None = None, threshold: float | None = None,
                   operations: Sequence[EditOp] | None = None, request_id: str | None = None) -> AsyncEdit:
        """Create an edit (retried safely: see ``Client.edit``); ``await edit.wait()`` until it is ready."""
        spec = rq.edit_spec(model, suppress=suppress, amplify=amplify, flip=flip, scale=scale, strength=strength,
                            layers=layers, top_n=top_n, threshold=threshold, operations=operations)
        request = pb.CreateEditRequest(spec=spec, request_id=rq.request_id(request_id))
        return AsyncEdit(self, await self._call(self._edits.CreateEdit, request))

    async def get_edit(self, name: str) -> AsyncEdit:
        return AsyncEdit(self, await self._get_edit_proto(name))

    async def edits(self, *, page_size: int = 0) -> AsyncIterator[AsyncEdit]:
        token = ""
        while True:
            r = await self._call(self._edits.ListEdits, pb.ListEditsRequest(page_size=page_size, page_token=token))
            for e in r.edits:
                yield AsyncEdit(self, e)
            token = r.next_page_token
            if not token:
                return

    async def delete_edit(self, edit: AsyncEdit | str) -> None:
        await self._call(self._edits.DeleteEdit, pb.DeleteEditRequest(name=rq.resource_name(edit)))

    async def download(self, edit: AsyncEdit | str, path: str | os.PathLike[str], *, overwrite: bool = True,
                       timeout: float = DOWNLOAD_TIMEOUT) -> Path:
        """Stream the edited checkpoint to ``path`` (sha256-verified, atomic rename, resumed on retry)."""
        name = rq.resource_name(edit)
        md = self.connection.metadata
        with AtomicDownload(path, overwrite=overwrite) as d:
            async def once() -> Path:
                req = pb.DownloadEditRequest(name=name, offset=d.written)
                async for chunk in self._edits.DownloadEdit(req, timeout=timeout, metadata=md):
                    if chunk.sha256:
                        d.begin(filename=chunk.filename, total_bytes=chunk.total_bytes, sha256=chunk.sha256)
                    d.write(chunk.data, chunk.offset)
                return d.commit()

            return await acall_with_retry(once, self.retry)

    async def _get_edit_proto(self, name: str) -> pb.Edit:
        return await self._call(self._edits.GetEdit, pb.GetEditRequest(name=name))

    # --- embeddings --------------------------------------------------------------------------

    async def embed_texts(self, texts: str | Sequence[str], *, model: str | None = None,
                          edit: AsyncEdit | str | None = None, normalize: bool = True) -> Embeddings:
        texts = [texts] if isinstance(texts, str) else list(texts)
        req = pb.EmbedTextsRequest(target=rq.model_ref(model, edit), texts=texts, normalize=normalize)
        return Embeddings.from_proto(await self._call(self._embeddings.EmbedTexts, req))

    async def embed_images(self, images: rq.ImageLike | Iterable[rq.ImageLike], *, model: str | None = None,
                           edit: AsyncEdit | str | None = None, normalize: bool = True) -> Embeddings:
        req = pb.EmbedImagesRequest(target=rq.model_ref(model, edit), images=rq.images_to_proto(images),
                                    normalize=normalize)
        return Embeddings.from_proto(await self._call(self._embeddings.EmbedImages, req))

    async def classify(self, images: rq.ImageLike | Iterable[rq.ImageLike], labels: Sequence[str], *,
                       model: str | None = None, edit: AsyncEdit | str | None = None,
                       template: str = "") -> Classification:
        req = pb.ClassifyRequest(target=rq.model_ref(model, edit), images=rq.images_to_proto(images),
                                 labels=list(labels), template=template)
        return Classification.from_proto(await self._call(self._embeddings.Classify, req), labels)

    # --- operations --------------------------------------------------------------------------

    async def _get_operation(self, name: str) -> pb.Operation:
        return await self._call(self._operations.GetOperation, pb.GetOperationRequest(name=name))

    async def _cancel_operation(self, name: str) -> pb.Operation:
        return await self._call(self._operations.CancelOperation, pb.CancelOperationRequest(name=name))

    async def _wait_operation(self, name: str, timeout: float | None,
                              on_update: Callable[[pb.Operation], None]) -> pb.Operation:
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retry.delays()
        while True:
            window = _remaining(deadline, name, timeout)
            try:
                stream = self._operations.WatchOperation(
                    pb.WatchOperationRequest(name=name), timeout=min(window, WATCH_WINDOW),
                    metadata=self.connection.metadata)
                async for op in stream:
                    delays = self.retry.delays()
                    on_update(op)
                    if op.done:
                        stream.cancel()
                        return op
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return await self._poll_operation(name, deadline, timeout, on_update)
                if self.retry.retryable(err):
                    delay = next(delays, None)
                    if delay is not None:
                        await asyncio.sleep(delay)
                        continue
                raise from_rpc_error(err) from None

    async def _poll_operation(self, name: str, deadline: float | None, timeout: float | None,
                              on_update: Callable[[pb.Operation], None]) -> pb.Operation:
        interval = POLL_INTERVAL[0]
        while True:
            op = await self._get_operation(name)
            on_update(op)
            if op.done:
                return op
            await asyncio.sleep(min(interval, _remaining(deadline, name, timeout)))
            interval = min(interval * 1.5, POLL_INTERVAL[1])
