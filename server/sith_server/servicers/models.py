"""sith.v1.Models: the models this server preloaded (the only ones clients can reach)."""

from __future__ import annotations

from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_server.deps import Deps
from sith_server.runtime import ServedModel


def model_proto(served: ServedModel) -> pb.Model:
    info = served.loaded.info
    return pb.Model(name=served.loaded.name, hash=served.loaded.hash, layers=info.layers, heads=info.heads,
                    width=info.width, head_dim=info.head_dim, output_dim=info.output_dim,
                    image_size=served.image_size, is_default=served.is_default)


class ModelsServicer(pb_grpc.ModelsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_proto(m) for m in self.deps.runtime.models])

    def GetModel(self, request, context):
        return model_proto(self.deps.runtime.get(request.model, "model"))
