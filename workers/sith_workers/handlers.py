"""Job kinds -> engine calls. ``HANDLERS[kind](ctx, payload) -> dict`` (the result JSON).

Handlers must be idempotent (delivery is at-least-once, a reclaimed job runs again): they only read
models, write content-addressed cache entries, and store edits under an id derived from the job,
so a re-run rewrites identical values. They call ``ctx.step`` between steps, which reports progress
and raises :class:`JobCancelled` when the client cancelled.

Payloads (all keys optional unless marked):
  decompose  {model, layers}
  explain    {model, layers, heads, method="comp", k=5, coherence=0.3, dictionary, image_mean}
  find       {model, concepts (required), layers, top=20, dictionary, image_mean}
  edit       {spec (required, EditSpec dict), model (default spec.model), edit_id, dry_run, dictionary,
              image_mean}
``model`` is a reference (see ``sith_workers.models.load_ref``) or a vision hash; ``dictionary`` is a
list of concepts (default: the built-in vocabulary); ``image_mean`` is "directions" (default) or "none".
Workers trust payloads (model references may be paths): the server validates every request, and
only it (and operators) may write to the Redis.
Other packages add kinds with :func:`register` (``sith worker --plugin MODULE`` imports them).
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sith.engine.errors import InvalidInput
from sith_workers.cache import RedisArtifactCache
from sith_workers.editstore import EditStore
from sith_workers.models import LRU, ModelPool
from sith_workers.queue import JobQueue, JobRecord

Handler = Callable[["JobContext", dict], dict]
HANDLERS: dict[str, Handler] = {}


class JobCancelled(Exception):
    """The client asked to cancel; the worker records state ``cancelled``."""


class JobLost(Exception):
    """Another worker reclaimed this job (our lease lapsed); stop without writing anything."""


class WorkerStopping(Exception):
    """The worker is shutting down; the job goes back to the queue."""


class Unimplemented(Exception):
    """A job kind this build registers but cannot run (maps to UNIMPLEMENTED)."""


@dataclass
class JobContext:
    """What a handler may use: the job, its device, the shared cache and per-process pools."""

    job: JobRecord
    queue: JobQueue
    cache: RedisArtifactCache
    models: ModelPool
    edits: EditStore
    device: str = "cpu"
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

        loaded = self.models.get(payload.get("model"))
        concepts = payload.get("dictionary")
        if concepts is not None and (not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts)):
            raise InvalidInput("dictionary", "expected a list of concept strings")
        image_mean = payload.get("image_mean", "directions")
        if image_mean not in ("directions", "none"):   # never a path: payloads must not name worker files
            raise InvalidInput("image_mean", "expected \"directions\" or \"none\"")
        key = (loaded.hash, concepts_hash(concepts) if concepts else "default", image_mean)

        def build():
            dictionary = build_dictionary(loaded, concepts, cache=self.cache)
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


def _model_info(ctx: JobContext, payload: dict) -> dict[str, Any]:
    loaded = ctx.models.get(payload.get("model"))
    return {"name": loaded.name, "hash": loaded.hash}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


@register("decompose")
def decompose(ctx: JobContext, payload: dict) -> dict:
    from sith.engine.decomposition import CONVENTION

    layers = _layers(ctx, payload)
    analyzer = ctx.analyzer(payload)
    out = []
    for i, layer in enumerate(layers):
        ctx.step(i / len(layers), f"decomposing layer {layer}")
        svd = analyzer.decomposition([layer])[layer]
        out.append({"layer": layer, "heads": int(svd.S.shape[0]), "rank": int(svd.S.shape[1]),
                    "singular_values": svd.S.tolist()})
    return {"model": _model_info(ctx, payload), "convention": CONVENTION, "layers": out}


@register("explain")
def explain(ctx: JobContext, payload: dict) -> dict:
    layers = _layers(ctx, payload)
    analyzer = ctx.analyzer(payload)
    options = {k: payload[k] for k in ("heads", "method", "k", "coherence") if k in payload}
    heads = []
    for i, layer in enumerate(layers):
        ctx.step(i / len(layers), f"explaining layer {layer}")
        heads += analyzer.explain(layers=[layer], **options)
    return {"model": _model_info(ctx, payload), "heads": _jsonable(heads)}


@register("find")
def find(ctx: JobContext, payload: dict) -> dict:
    concepts = payload.get("concepts")
    if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) for c in concepts):
        raise InvalidInput("concepts", "expected a non-empty list of concept names")
    ctx.step(0.0, "preparing")
    analyzer = ctx.analyzer(payload)
    ctx.step(0.3, "searching")
    hits = analyzer.find(concepts, layers=payload.get("layers"), top=payload.get("top", 20))
    return {"model": _model_info(ctx, payload), "hits": _jsonable(hits)}


@register("edit")
def edit(ctx: JobContext, payload: dict) -> dict:
    """Validate the spec and plan it; unless ``dry_run``, store multipliers + manifest as a
    persistent edit of the job's tenant."""
    from sith.edits.plan import plan_edit
    from sith.edits.spec import EditSpec
    from sith.engine.decomposition import CONVENTION

    spec = EditSpec.from_dict(payload.get("spec"))
    model_ref = payload.get("model") or spec.model      # the server sends its worker reference
    ctx.step(0.0, "loading model and dictionary")
    analyzer = ctx.analyzer({**payload, "model": model_ref})
    ctx.step(0.3, "planning edit")
    plan = plan_edit(analyzer, spec)
    plan_dict = _jsonable(plan.to_dict())
    if payload.get("dry_run"):
        return {"plan": plan_dict}
    ctx.step(0.9, "storing edit")
    edit_id = payload.get("edit_id") or f"edit-{ctx.job.id}"     # job-derived: a re-run rewrites it
    manifest = {**_jsonable(plan.manifest()), "edit_id": edit_id, "convention": CONVENTION,
                "tenant": ctx.job.tenant, "job_id": ctx.job.id}
    record = ctx.edits.put(ctx.job.tenant, edit_id, plan.multipliers.to_bytes(), manifest, plan_dict)
    return {"edit_id": record.id, "manifest": manifest, "plan": plan_dict}


def _optional(kind: str, module: str, function: str) -> Handler:
    """A kind whose implementation lives in another package that may not be built yet."""
    def run(ctx: JobContext, payload: dict) -> dict:
        try:
            fn = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as exc:
            raise Unimplemented(f"job kind {kind!r} is not available in this build ({module}.{function})") from exc
        return fn(ctx, payload)
    return run


# Registration points filled by sith_workers.adaptation_handlers (fine-tuning deltas, cross-model universality).
register("adapt_delta")(_optional("adapt_delta", "sith_workers.adaptation_handlers", "adapt_delta"))
register("universality")(_optional("universality", "sith_workers.adaptation_handlers", "universality"))
