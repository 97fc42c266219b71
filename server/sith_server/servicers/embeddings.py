"""sith.v1.Embeddings: answered in this process (no queue) against base or edited models."""

from __future__ import annotations

from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel
from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_server import convert, runtime
from sith_server.deps import Deps
from sith_server.servicers.edits import EditsServicer

DEFAULT_TEMPLATE = "a photo of a {}."


class EmbeddingsServicer(pb_grpc.EmbeddingsServicer):
    def __init__(self, deps: Deps, edits: EditsServicer) -> None:
        self.deps = deps
        self._edits = edits

    def _model(self, target: pb.ModelRef) -> LoadedModel:
        if target.WhichOneof("ref") == "edit":
            return self._edits.edited_model(target.edit, "target.edit")
        return self.deps.runtime.get(target.model, "target.model").loaded

    @staticmethod
    def _pixels(loaded: LoadedModel, images) -> object:
        items = []
        for i, image in enumerate(images):
            which = image.WhichOneof("source")
            if which is None:
                raise InvalidInput(f"images[{i}]", "set either tensor or encoded")
            if which == "encoded":
                items.append(image.encoded)
            else:
                if image.tensor.dtype not in (pb.Tensor.DTYPE_UNSPECIFIED, pb.Tensor.FLOAT32):
                    raise InvalidInput(f"images[{i}].tensor.dtype", "only FLOAT32 is accepted")
                items.append((list(image.tensor.shape), image.tensor.data))
        return runtime.image_batch(loaded, items, "images")

    def EmbedImages(self, request, context):
        loaded = self._model(request.target)
        out = runtime.embed_images(loaded, self._pixels(loaded, request.images), request.normalize)
        return pb.EmbedResponse(embeddings=convert.tensor(out), model_hash=loaded.hash)

    def EmbedTexts(self, request, context):
        if request.target.WhichOneof("ref") == "edit":
            raise InvalidInput("target.edit", "edits change only the vision tower, so an edited model's text "
                               "embeddings are its base model's: embed texts with target.model instead")
        loaded = self._model(request.target)
        out = runtime.embed_texts(loaded, request.texts, request.normalize)
        return pb.EmbedResponse(embeddings=convert.tensor(out), model_hash=loaded.hash)

    def Classify(self, request, context):
        for i, label in enumerate(request.labels):
            if not label.strip():
                raise InvalidInput(f"labels[{i}]", "empty label")
        template = request.template or DEFAULT_TEMPLATE
        if "{}" not in template:
            raise InvalidInput("template", "must contain '{}' where the label goes")
        loaded = self._model(request.target)
        probs = runtime.classify(loaded, self._pixels(loaded, request.images), request.labels, template)
        predicted = [request.labels[int(i)] for i in probs.argmax(dim=-1)]
        return pb.ClassifyResponse(probabilities=convert.tensor(probs), predicted=predicted)
