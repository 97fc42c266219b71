"""sith.v1.Analysis: validate, then queue the engine work for the workers (Operations track it).

Request bounds (k, top, counts, lengths) were checked against the proto by the error interceptor;
what is checked here needs the model (layer and head ranges) or the vocabulary (concept names).
"""

from __future__ import annotations

import hashlib
import json

from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_server import convert, validate
from sith_server.auth import current_tenant
from sith_server.deps import Deps
from sith_server.runtime import ServedModel


def worker_ref(served: ServedModel) -> str:
    """The reference workers load the model by (the operator's SITH_MODELS entry)."""
    return served.spec or "default"


class AnalysisServicer(pb_grpc.AnalysisServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def _submit(self, kind: str, served: ServedModel, payload: dict):
        # "target" is what clients see in the operation's metadata: never a server-side path.
        payload = {"model": worker_ref(served), "target": served.loaded.name, **payload,
                   **self.deps.vocabulary.job_fields()}
        # Identical requests from one tenant share one live job (and its cached result).
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
        dedupe = f"{kind}:{served.loaded.hash[:16]}:{digest}"
        record = self.deps.queue.submit(kind, payload, current_tenant(), dedupe_key=dedupe)
        return convert.operation(record)

    def Decompose(self, request, context):
        served = self.deps.runtime.get(request.model)
        return self._submit("decompose", served, {"layers": validate.layers(served.loaded.info, request.layers)})

    def ExplainHeads(self, request, context):
        served = self.deps.runtime.get(request.model)
        info = served.loaded.info
        payload = {"layers": validate.layers(info, request.layers), "heads": validate.heads(info, request.heads),
                   "method": validate.method(request.method), "k": int(validate.value(request, "k"))}
        if request.HasField("coherence"):
            payload["coherence"] = request.coherence
        return self._submit("explain", served, payload)

    def FindConcept(self, request, context):
        served = self.deps.runtime.get(request.model)
        concepts = self.deps.vocabulary.check(list(request.concepts), "concepts")
        payload = {"concepts": concepts, "layers": validate.layers(served.loaded.info, request.layers),
                   "top": int(validate.value(request, "top"))}
        return self._submit("find", served, payload)
