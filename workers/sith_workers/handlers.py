"""Job kinds -> engine calls. ``HANDLERS[kind](ctx, payload)`` returns the job's typed result.

Results are sith.v1 messages built in ``sith_workers.results`` (the worker stores them as a
google.protobuf.Any; the server hands that to clients as ``Operation.response``). A handler may
return a plain dict instead (extension kinds, tests): it travels as a google.protobuf.Struct.

Handlers must be idempotent (delivery is at-least-once, a reclaimed job runs again): they only read
models, write content-addressed cache entries, and write their edit's one record and artifact
(same path, atomic replace), so a re-run rewrites identical values. They call ``ctx.step`` between
steps, which reports progress and raises :class:`JobCancelled` when the client cancelled.

Payloads (all keys optional unless marked):
  decompose  {model, layers}
  explain    {model, layers, heads, method (engine default), k=5, coherence=0.3, dictionary, image_mean}
  find       {model, concepts (required), layers, top=20, dictionary, image_mean}
  edit       {model (required), edit_id (a stored edit: plan, apply, export) | spec (a sith.v1.EditSpec
              in proto JSON: a dry run), dictionary, image_mean}
  adapt_delta, universality: see ``sith_workers.adaptation_handlers``.
``model`` is a reference (see ``sith_workers.models.load_ref``) or a vision hash; ``dictionary`` is a
list of concepts (default: the built-in vocabulary); ``image_mean`` is a data-free mean by name
(``sith.engine.jointspace.DATA_FREE_MEANS``; default ``DEFAULT_IMAGE_MEAN``, "poles") or "none".
Workers trust payloads (model references may be paths): the server validates every request, and
only it (and operators) may write to the Redis.
Other packages add kinds with :func:`register` (``sith worker --plugin MODULE`` imports them).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import Message

from sith.engine.errors import InvalidInput
from sith_api.v1 import sith_pb2 as pb
from sith_workers import adaptation_handlers, results, specs
from sith_workers.cache import RedisArtifactCache
from sith_workers.edits import EditStore
from sith_workers.models import LRU, ModelPool
from sith_workers.queue import JobQueue, JobRecord

Handler = Callable[["JobContext", dict], Message | dict]
HANDLERS: dict[str, Handler] = {}


class JobCancelled(Exception):
    """The client asked to cancel; the worker records state ``cancelled``."""


class JobLost(Exception):
    """Another worker reclaimed this job (our lease lapsed); stop without writing anything."""


class WorkerStopping(Exception):
    """The worker is shutting down; the job goes back to the queue."""


@dataclass
class JobContext:
    """What a handler may use: the job, its device, the shared cache and per-process pools."""

    job: JobRecord
    queue: JobQueue
    cache: RedisArtifactCache
    models: ModelPool
    edits: EditStore
    device: str = "cpu"
    data_dir: Path = field(default_factory=lambda: Path("~/.cache/sith").expanduser())
    analyzers: LRU = field(default_factory=lambda: LRU(4))
    lost: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise if the job should stop now (lease lost or worker stopping)."""
        if self.lost.is_set():
            raise JobLost(self.job.id)
        if self.stopping.is_set():
            raise WorkerStopping(self.job.id)

    def step(self, fraction: float, message: str) -> None:
        """Report progress (0..1) and stop here if the job was cancelled."""
        self.check()
        status = self.queue.progress(self.job, fraction, message)
        if status == "cancel":
            raise JobCancelled(self.job.id)
        if status == "finished":
            raise JobLost(self.job.id)

    def analyzer(self, payload: dict):
        """An Analyzer for the payload's model, dictionary and image mean (kept per process)."""
        from sith.engine.analysis import Analyzer
        from sith.engine.dictionary import build_dictionary, concepts_hash
        from sith.engine.jointspace import DATA_FREE_MEANS, DEFAULT_IMAGE_MEAN

        loaded = self.models.get(payload.get("model"))
        concepts = payload.get("dictionary")
        if concepts is not None and (not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts)):
            raise InvalidInput("dictionary", "expected a list of concept strings")
        image_mean = payload.get("image_mean") or DEFAULT_IMAGE_MEAN
        if image_mean != "none" and image_mean not in DATA_FREE_MEANS:   # never a path: payloads must not name worker files
            raise InvalidInput("image_mean", f"expected one of {', '.join(sorted([*DATA_FREE_MEANS, 'none']))}")
        key = (loaded.hash, concepts_hash(concepts) if concepts else "default", image_mean)

        def build():
            # progress: a cold dictionary (seconds of text encoding) stays cancellable per batch
            dictionary = build_dictionary(loaded, concepts, cache=self.cache, progress=self.engine_progress)
            return Analyzer(loaded, dictionary, image_mean=image_mean, device=self.device, cache=self.cache)

        analyzer = self.analyzers.get_or_create(key, build)
        analyzer.progress = self.engine_progress     # this job's progress (one job per process at a time)
        return analyzer

    def engine_progress(self, description: str, total: int) -> Callable[[int], None]:
        """The engine's ProgressFactory: report inner-loop progress (at most once a second, keeping
        the job's fraction) so long COMP runs stay cancellable."""
        done = 0
        last = 0.0

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            if time.monotonic() - last >= 1.0 or done >= total:
                last = time.monotonic()
                self.step(self.job.progress, f"{description}: {done}/{total}")
        return advance


def register(kind: str) -> Callable[[Handler], Handler]:
    """Decorator adding a job kind (later registrations replace earlier ones)."""
    def decorate(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn
    return decorate


def _layers(ctx: JobContext, payload: dict) -> list[int]:
    from sith.engine.decomposition import resolve_layers

    return resolve_layers(ctx.models.get(payload.get("model")).info, payload.get("layers"))


@register("decompose")
def decompose(ctx: JobContext, payload: dict) -> pb.DecomposeResponse:
    from sith.engine.decomposition import CONVENTION

    layers = _layers(ctx, payload)
    analyzer = ctx.analyzer(payload)
    svds = {}
    for i, layer in enumerate(layers):
        ctx.step(i / len(layers), f"decomposing layer {layer}")
        svds[layer] = analyzer.decomposition([layer])[layer]
    return results.decompose(analyzer.loaded, CONVENTION, svds)


@register("explain")
def explain(ctx: JobContext, payload: dict) -> pb.ExplainHeadsResponse:
    layers = _layers(ctx, payload)
    analyzer = ctx.analyzer(payload)
    options = {k: payload[k] for k in ("heads", "method", "k", "coherence") if k in payload}
    heads = []
    for i, layer in enumerate(layers):
        ctx.step(i / len(layers), f"explaining layer {layer}")
        heads += analyzer.explain(layers=[layer], **options)
    return results.explain(analyzer.loaded, heads)


@register("find")
def find(ctx: JobContext, payload: dict) -> pb.FindConceptResponse:
    concepts = payload.get("concepts")
    if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) for c in concepts):
        raise InvalidInput("concepts", "expected a non-empty list of concept names")
    ctx.step(0.0, "preparing")
    analyzer = ctx.analyzer(payload)
    ctx.step(0.3, "searching")
    hits = analyzer.find(concepts, layers=payload.get("layers"), top=payload.get("top", 20))
    return results.find(analyzer.loaded, hits)


class EditGone(Exception):
    """The edit was deleted while its job waited or ran: the job ends as cancelled."""


@register("edit")
def edit(ctx: JobContext, payload: dict) -> pb.EditPlan | pb.Edit:
    """Plan a spec; for a stored edit (``edit_id``) also apply it, export the checkpoint once and
    move the edit to READY. The result is the EditPlan (dry run) or the READY Edit (without its
    plan, which GetEdit returns)."""
    edit_id = payload.get("edit_id")
    if edit_id:
        record = ctx.edits.get(ctx.job.tenant, edit_id)
        if record is None:
            raise EditGone(edit_id)
        spec = record.edit.spec
    else:
        spec = json_format.ParseDict(payload.get("spec") or {}, pb.EditSpec())
    library_spec = specs.to_library(spec, payload["model"])
    ctx.step(0.0, "loading model and dictionary")
    from sith.edits.plan import plan_edit

    analyzer = ctx.analyzer(payload)
    ctx.step(0.3, "planning edit")
    plan = plan_edit(analyzer, library_spec)
    plan_message = results.edit_plan(plan, spec)
    if not edit_id:
        return plan_message
    ctx.step(0.7, "applying and exporting the edited model")
    from sith_workers.gc import check_artifact_quota   # per-tenant artifact bytes (issue 15)

    check_artifact_quota(artifact_path(ctx.data_dir, ctx.job.tenant, edit_id).parent, ctx.job.tenant,
                         ctx.queue.limits.max_artifact_bytes, sum(p.numel() * p.element_size()
                                                                  for p in analyzer.loaded.model.parameters()))
    path, artifact = export_edit(ctx, analyzer.loaded, plan, edit_id)
    ctx.step(0.95, "storing edit")
    done = ctx.edits.ready(ctx.job.tenant, edit_id, plan_message, plan.multipliers.to_bytes(), artifact, str(path))
    if done is None:                       # deleted meanwhile: leave no artifact behind
        path.unlink(missing_ok=True)
        raise EditGone(edit_id)
    done.edit.ClearField("plan")
    return done.edit


_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def artifact_path(data_dir: Path, tenant: str, edit_id: str) -> Path:
    """``{data_dir}/edits/{tenant}/{id}.safetensors`` (a tenant name that is not a safe path
    component is replaced by its hash)."""
    folder = tenant if _SAFE.fullmatch(tenant) else "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:32]
    return data_dir / "edits" / folder / f"{edit_id}.safetensors"


def export_edit(ctx: JobContext, loaded, plan, edit_id: str) -> tuple[Path, pb.Artifact]:
    """Write the edited model once, as one .safetensors file carrying its open_clip config and
    the manifest (atomic rename, so a reader never sees half a file); path and Artifact."""
    from sith.edits.apply import apply_multipliers
    from sith.edits.export import export_model
    from sith.engine.decomposition import CONVENTION

    edited = apply_multipliers(loaded.model, plan.multipliers, plan.decomposition)
    manifest = {**plan.manifest(), "edit_id": edit_id, "convention": CONVENTION, "job_id": ctx.job.id}
    path = artifact_path(ctx.data_dir, ctx.job.tenant, edit_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{edit_id}.", suffix=".safetensors")
    os.close(fd)
    try:
        export_model(edited, tmp, manifest, getattr(loaded, "config", None))
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, pb.Artifact(filename=f"{edit_id}.safetensors", size_bytes=path.stat().st_size,
                             sha256=digest.hexdigest())


register("adapt_delta")(adaptation_handlers.adapt_delta)
register("universality")(adaptation_handlers.universality)
