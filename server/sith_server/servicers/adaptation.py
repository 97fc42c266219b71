"""sith.v1.Adaptation: validate, then queue ``adapt_delta`` / ``universality`` jobs for the workers."""

from __future__ import annotations

import hashlib
import json

from sith.engine.errors import InvalidInput
from sith_api.v1 import adaptation_pb2 as pb
from sith_api.v1 import adaptation_pb2_grpc as pb_grpc
from sith_server import convert, validate
from sith_server.auth import current_tenant
from sith_server.deps import Deps
from sith_server.servicers.analysis import worker_ref


def _common(request, payload: dict, deps: Deps) -> dict:
    payload["k"] = int(validate.value(request, "k"))
    if request.HasField("coherence"):
        payload["coherence"] = request.coherence
    if request.vocabulary == pb.VOCABULARY_TESTBED:
        payload["vocabulary"] = "testbed"
    else:
        payload.update(deps.vocabulary.job_fields())
    return payload


# HeadProfile enum -> the library's profile name (sith.adaptation.universality.PROFILES); unset = its default.
PROFILE_NAMES = {pb.HEAD_PROFILE_COMP: "comp", pb.HEAD_PROFILE_CAPACITY: "capacity",
                 pb.HEAD_PROFILE_RELATIVE_CAPACITY: "relative-capacity"}


def _profile(request) -> str | None:
    if request.profile == pb.HEAD_PROFILE_UNSPECIFIED:
        return None
    if request.profile not in PROFILE_NAMES:
        raise InvalidInput("profile", f"unknown HeadProfile value {request.profile}; use one of "
                           f"{[pb.HeadProfile.Name(v) for v in PROFILE_NAMES]}")
    return PROFILE_NAMES[request.profile]


class AdaptationServicer(pb_grpc.AdaptationServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def _submit(self, kind: str, target: str, hashes: str, payload: dict):
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
        record = self.deps.queue.submit(kind, {"target": target, **payload}, current_tenant(),
                                        dedupe_key=f"{kind}:{hashes}:{digest}")
        return convert.operation(record)

    def AnalyzeDelta(self, request, context):
        base = self.deps.runtime.get(request.base, "base")
        if not request.finetuned:
            raise InvalidInput("finetuned", "required")
        ft = self.deps.runtime.get(request.finetuned, "finetuned")
        if base.loaded.info != ft.loaded.info:
            raise InvalidInput("finetuned", f"architecture differs from the base model: "
                               f"{ft.loaded.info} vs {base.loaded.info}")
        payload = {"base": worker_ref(base), "finetuned": worker_ref(ft),
                   "layers": validate.layers(base.loaded.info, request.layers),
                   "directions": int(validate.value(request, "directions")),
                   "top": int(validate.value(request, "top"))}
        payload = _common(request, payload, self.deps)
        return self._submit("adapt_delta", f"{base.loaded.name} -> {ft.loaded.name}",
                            f"{base.loaded.hash[:12]}:{ft.loaded.hash[:12]}", payload)

    def MatchHeads(self, request, context):
        a = self.deps.runtime.get(request.model_a, "model_a")
        b = self.deps.runtime.get(request.model_b, "model_b")
        payload = {"model_a": worker_ref(a), "model_b": worker_ref(b),
                   "layers_a": validate.layers(a.loaded.info, request.layers_a, "layers_a"),
                   "layers_b": validate.layers(b.loaded.info, request.layers_b, "layers_b")}
        if request.testbed_categories:
            payload["categories"] = "testbed"
        profile = _profile(request)
        if profile is not None:
            payload["profile"] = profile
        payload = _common(request, payload, self.deps)
        return self._submit("universality", f"{a.loaded.name} <-> {b.loaded.name}",
                            f"{a.loaded.hash[:12]}:{b.loaded.hash[:12]}", payload)


def add_to_server(server, deps: Deps) -> None:
    pb_grpc.add_AdaptationServicer_to_server(AdaptationServicer(deps), server)
