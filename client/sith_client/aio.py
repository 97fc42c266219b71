"""The asyncio client: :class:`~sith_client._base.BaseClient` plus ``await``-able I/O.

Same methods, arguments and results as :class:`~sith_client.Client`; create it inside the event
loop that uses it::

    async with sith_client.AsyncClient() as c:
        edit = await c.wait(await c.edit(suppress=["red"]))
        await c.download(edit, "out.safetensors")
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

from sith_api.v1 import adaptation_pb2 as apb
from sith_api.v1 import adaptation_pb2_grpc as arpc
from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as rpc

from . import _progress
from ._base import (DOWNLOAD_TIMEOUT, POLL_INTERVAL, WATCH_WINDOW, BaseClient, Concepts, ImageLike, checked,
                    resource_name)
from ._download import AtomicDownload
from ._retry import acall_with_retry
from .client import _remaining
from .errors import Unimplemented, from_rpc_error
from .jobs import Edit, Job
from .types import Classification, EditOp, Embeddings

T = TypeVar("T")

__all__ = ["AsyncClient"]


class AsyncClient(BaseClient):
    """Asyncio connection to a SITH server (see :class:`~sith_client.Client` for the options)."""

    def __init__(self, address: str | None = None, **options: Any) -> None:
        super().__init__(address, **options)
        self._channel = self.connection.aio_channel()
        self._models = rpc.ModelsStub(self._channel)
        self._analysis = rpc.AnalysisStub(self._channel)
        self._edits = rpc.EditsStub(self._channel)
        self._embeddings = rpc.EmbeddingsStub(self._channel)
        self._operations = rpc.OperationsStub(self._channel)
        self._adaptation = arpc.AdaptationStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, *, timeout: float | None = None) -> T:
        md = self.connection.metadata
        t = timeout or self.timeout
        return await acall_with_retry(lambda: method(request, timeout=t, metadata=md), self.retry)

    # --- models ------------------------------------------------------------------------------
    async def models(self) -> list[pb.Model]:
        """Models the server has loaded (the default one has ``is_default``)."""
        return list((await self._call(self._models.ListModels, pb.ListModelsRequest())).models)

    async def model(self, name: str = "") -> pb.Model:
        """One model by name or hash (empty = the default model)."""
        return await self._call(self._models.GetModel, checked(pb.GetModelRequest(model=name)))

    # --- analysis (long-running) -------------------------------------------------------------
    async def _start(self, method: Callable, request: Any, result_type: type, wait: bool, timeout: float | None,
               progress: _progress.ProgressArg) -> Any:
        job = self._job(await self._call(method, request), result_type)
        return await self.result(job, timeout=timeout, progress=progress) if wait else job

    async def decompose(self, model: str | None = None, *, layers: Sequence[int] | None = None, wait: bool = True,
                  timeout: float | None = None, progress: _progress.ProgressArg = False) -> pb.DecomposeResponse:
        """Per-head singular values of ``layers`` (default: the last four)."""
        return await self._start(self._analysis.Decompose, self._decompose_request(model, layers),
                           pb.DecomposeResponse, wait, timeout, progress)

    async def explain(self, model: str | None = None, *, layers: Sequence[int] | None = None,
                heads: Sequence[int] | None = None, method: str = "comp", k: int | None = None,
                coherence: float | None = None, wait: bool = True, timeout: float | None = None,
                progress: _progress.ProgressArg = False) -> pb.ExplainHeadsResponse:
        """Explain each head's singular vectors as sparse concept mixes (COMP by default)."""
        return await self._start(self._analysis.ExplainHeads, self._explain_request(model, layers, heads, method, k, coherence),
                           pb.ExplainHeadsResponse, wait, timeout, progress)

    async def find(self, concepts: Concepts, *, model: str | None = None, layers: Sequence[int] | None = None,
             top: int | None = None, wait: bool = True, timeout: float | None = None,
             progress: _progress.ProgressArg = False) -> pb.FindConceptResponse:
        """Singular vectors that best match ``concepts``, best first (``.hits``)."""
        return await self._start(self._analysis.FindConcept, self._find_request(concepts, model, layers, top),
                           pb.FindConceptResponse, wait, timeout, progress)

    async def analyze_delta(self, base: str, finetuned: str, *, layers: Sequence[int] | None = None,
                      directions: int | None = None, top: int | None = None, k: int | None = None,
                      coherence: float | None = None, testbed_vocabulary: bool = False, wait: bool = True,
                      timeout: float | None = None, progress: _progress.ProgressArg = False) -> apb.DeltaReport:
        """What fine-tuning changed in each head of ``base`` (both served models)."""
        req = self._delta_request(base, finetuned, layers, directions, top, k, coherence, testbed_vocabulary)
        return await self._start(self._adaptation.AnalyzeDelta, req, apb.DeltaReport, wait, timeout, progress)

    async def match_heads(self, model_a: str, model_b: str, *, layers_a: Sequence[int] | None = None,
                    layers_b: Sequence[int] | None = None, k: int | None = None, coherence: float | None = None,
                    testbed_vocabulary: bool = False, testbed_categories: bool = False,
                    profile: str | None = None, wait: bool = True,
                    timeout: float | None = None, progress: _progress.ProgressArg = False) -> apb.MatchReport:
        """Which heads of two models encode the same concepts. ``profile``: "relative-capacity" (unset:
        the server's default), "capacity" (a model against its own fine-tune) or "comp" (the paper's)."""
        req = self._match_request(model_a, model_b, layers_a, layers_b, k, coherence, testbed_vocabulary,
                                  testbed_categories, profile)
        return await self._start(self._adaptation.MatchHeads, req, apb.MatchReport, wait, timeout, progress)

    # --- operations --------------------------------------------------------------------------
    async def job(self, name: str) -> Job:
        """Re-attach to an operation by name ("operations/{id}")."""
        return self._job(await self._call(self._operations.GetOperation, checked(pb.GetOperationRequest(name=name))))

    async def refresh(self, handle: Job | Edit) -> Job | Edit:
        """A fresh snapshot of a job or edit."""
        if isinstance(handle, Edit):
            return await self.get_edit(handle.name)
        op = await self._call(self._operations.GetOperation, pb.GetOperationRequest(name=handle.name))
        return Job(op, handle.result_type)

    async def cancel(self, job: Job) -> Job:
        """Ask the server to stop the job (best effort); the snapshot shows what it said."""
        return Job(await self._call(self._operations.CancelOperation, pb.CancelOperationRequest(name=job.name)),
                   job.result_type)

    async def wait(self, handle: Job | Edit, *, timeout: float | None = None,
             progress: _progress.ProgressArg = False) -> Any:
        """Block until the job is done (or the edit ready), following its progress; returns the
        final snapshot. Raises :class:`JobFailed` (also of the failure's own type) if it failed or
        was cancelled, :class:`DeadlineExceeded` after ``timeout`` seconds (the work goes on)."""
        cb = _progress.callback(progress)
        if isinstance(handle, Edit):
            if handle.state == "pending" and handle.operation:
                # follow the edit's job directly; the edit record then carries the outcome (and the
                # authoritative error, if any)
                await self._follow(handle.operation, timeout, lambda op: cb(Job(op)) if cb else None)
            return (await self.get_edit(handle.name)).check()
        job = handle
        if not job.done:
            def on_update(op: pb.Operation) -> None:
                if cb:
                    cb(Job(op, job.result_type))
            job = Job(await self._follow(job.name, timeout, on_update), job.result_type)
        elif cb:
            cb(job)
        if job.state in ("failed", "cancelled"):
            job.result()  # raises the typed failure
        return job

    async def result(self, job: Job, *, timeout: float | None = None, progress: _progress.ProgressArg = False) -> Any:
        """Wait for ``job``, then return its typed result (e.g. an ExplainHeadsResponse)."""
        return (await self.wait(job, timeout=timeout, progress=progress)).result()

    async def _follow(self, name: str, timeout: float | None, on_update: Callable[[pb.Operation], None]) -> pb.Operation:
        """Follow ``WatchOperation`` until done, re-opening the stream when it ends or drops."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retry.delays()
        while True:
            window = _remaining(deadline, name, timeout)
            try:
                stream = self._operations.WatchOperation(
                    pb.WatchOperationRequest(name=name), timeout=min(window, WATCH_WINDOW),
                    metadata=self.connection.metadata)
                async for op in stream:
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
                    return await self._poll(name, deadline, timeout, on_update)
                if self.retry.retryable(err):
                    delay = next(delays, None)
                    if delay is not None:
                        await asyncio.sleep(delay)
                        continue
                raise from_rpc_error(err) from None

    async def _poll(self, name: str, deadline: float | None, timeout: float | None,
              on_update: Callable[[pb.Operation], None]) -> pb.Operation:
        interval = POLL_INTERVAL[0]
        while True:
            op = await self._call(self._operations.GetOperation, pb.GetOperationRequest(name=name))
            on_update(op)
            if op.done:
                return op
            await asyncio.sleep(min(interval, _remaining(deadline, name, timeout)))
            interval = min(interval * 1.5, POLL_INTERVAL[1])

    # --- edits -------------------------------------------------------------------------------
    async def preview_edit(self, model: str | None = None, *, suppress: Concepts = None, amplify: Concepts = None,
                           flip: Concepts = None, scale: Concepts = None, debias: Concepts = None,
                           strength: float | None = None, layers: Sequence[int] | None = None, top_n: int | None = None,
                           threshold: float | None = None, operator: str | None = None, target: float | None = None,
                           preserve: Concepts = None, anchor: str | None = None,
                           operations: Sequence[EditOp] | None = None, timeout: float | None = None,
                           progress: _progress.ProgressArg = False) -> pb.EditPlan:
        """Dry run: the EditPlan (vectors, α, predicted effects, warnings), stored nowhere."""
        spec = self._edit_spec(model, suppress=suppress, amplify=amplify, flip=flip, scale=scale, debias=debias,
                               strength=strength, layers=layers, top_n=top_n, threshold=threshold, operator=operator,
                               target=target, preserve=preserve, anchor=anchor, operations=operations)
        return await self._start(self._edits.PreviewEdit, pb.PreviewEditRequest(spec=spec), pb.EditPlan, True, timeout,
                           progress)

    async def edit(self, model: str | None = None, *, suppress: Concepts = None, amplify: Concepts = None,
                   flip: Concepts = None, scale: Concepts = None, debias: Concepts = None,
                   strength: float | None = None, layers: Sequence[int] | None = None, top_n: int | None = None,
                   threshold: float | None = None, operator: str | None = None, target: float | None = None,
                   preserve: Concepts = None, anchor: str | None = None,
                   operations: Sequence[EditOp] | None = None, request_id: str | None = None) -> Edit:
        """Create an edit; returns at once with ``state == "pending"`` (``client.wait(edit)``).

        ``strength`` is α for every action (``suppress=["red"], strength=0.5`` halves the selected
        singular values). Every call carries an idempotency key (``request_id``, fresh by default),
        so a retry after a lost response returns the edit the first attempt created.
        """
        spec = self._edit_spec(model, suppress=suppress, amplify=amplify, flip=flip, scale=scale, debias=debias,
                               strength=strength, layers=layers, top_n=top_n, threshold=threshold, operator=operator,
                               target=target, preserve=preserve, anchor=anchor, operations=operations)
        return self._edit(await self._call(self._edits.CreateEdit, self._create_request(spec, request_id)))

    async def get_edit(self, name: str | Edit) -> Edit:
        return self._edit(await self._call(self._edits.GetEdit, checked(pb.GetEditRequest(name=resource_name(name)))))

    async def edits(self, *, page_size: int | None = None) -> AsyncIterator[Edit]:
        """Every edit of this tenant, newest first, pages fetched lazily (without plans)."""
        token = ""
        while True:
            req = checked(pb.ListEditsRequest(page_size=page_size or 0, page_token=token))
            r = await self._call(self._edits.ListEdits, req)
            for e in r.edits:
                yield self._edit(e)
            token = r.next_page_token
            if not token:
                return

    async def delete_edit(self, edit: Edit | str) -> None:
        await self._call(self._edits.DeleteEdit, checked(pb.DeleteEditRequest(name=resource_name(edit))))

    async def download(self, edit: Edit | str, path: str | os.PathLike[str], *, overwrite: bool = True,
                       timeout: float = DOWNLOAD_TIMEOUT, transport: str = "auto") -> Path:
        """Download the edited model (one .safetensors file carrying its open_clip config) to ``path``.

        The sha256 the server announces is checked before the file is atomically renamed into
        place; ``path`` may be a directory. With ``transport="auto"`` the file comes over the
        short-lived signed HTTP URL the server offers (``GetDownloadUrl``; several times faster than
        the gRPC stream), else over the ``DownloadEdit`` stream; a dropped transfer resumes from the
        last byte received, over gRPC if HTTP gave up. ``"grpc"`` skips HTTP; ``"http"`` requires it.
        """
        self._check_transport(transport)
        name = resource_name(edit)
        md = self.connection.metadata
        with AtomicDownload(path, overwrite=overwrite) as d:
            if transport != "grpc":
                offer = None
                try:
                    offer = await self._call(self._edits.GetDownloadUrl, checked(pb.GetDownloadUrlRequest(name=name)))
                except Unimplemented:              # a server older than GetDownloadUrl
                    if transport == "http":
                        raise
                if await asyncio.to_thread(self._http_fetch, offer, d, timeout, transport):
                    return d.commit()

            async def once() -> Path:
                async for chunk in self._edits.DownloadEdit(self._download_request(name, d.written), timeout=timeout,
                                                      metadata=md):
                    if chunk.sha256:
                        d.begin(filename=chunk.filename, total_bytes=chunk.total_bytes, sha256=chunk.sha256)
                    d.write(chunk.data, chunk.offset)
                return d.commit()

            return await acall_with_retry(once, self.retry)

    # --- embeddings --------------------------------------------------------------------------
    async def embed_texts(self, texts: str | Sequence[str], *, model: str | None = None, edit: Edit | str | None = None,
                    normalize: bool = True) -> Embeddings:
        """Text embeddings ``[N, D]`` of a base model (``edit=`` is rejected: edits change only images)."""
        req = self._embed_texts_request(texts, model, edit, normalize)
        return Embeddings.from_proto(await self._call(self._embeddings.EmbedTexts, req))

    async def embed_images(self, images: ImageLike | Iterable[ImageLike], *, model: str | None = None,
                     edit: Edit | str | None = None, normalize: bool = True) -> Embeddings:
        """Image embeddings ``[N, D]`` from a base or edited model. Images are encoded files (bytes
        or paths, preprocessed by the server) or float32 arrays already preprocessed."""
        req = self._embed_images_request(images, model, edit, normalize)
        return Embeddings.from_proto(await self._call(self._embeddings.EmbedImages, req))

    async def classify(self, images: ImageLike | Iterable[ImageLike], labels: Sequence[str], *,
                 model: str | None = None, edit: Edit | str | None = None, template: str = "") -> Classification:
        """Zero-shot classification of ``images`` over ``labels``."""
        req = self._classify_request(images, labels, model, edit, template)
        return Classification.from_proto(await self._call(self._embeddings.Classify, req), labels)

