"""sith.v1.Embeddings: answered in this process (no queue) against base or edited models."""

from __future__ import annotations

from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel
from sith_client.v1 import sith_pb2 as pb
from sith_client.v1 import sith_pb2_grpc as pb_grpc
from sith_server import convert, runtime, validate
from sith_server.deps import Deps
from sith_server.servicers.edits import EditsServicer

MAX_IMAGES = 256
MAX_TEXTS = 512                # 512 x 1024-d float32 = 2 MiB, well under 4 MB
MAX_LABELS = 1000
DEFAULT_TEMPLATE = "a photo of a {}."


class EmbeddingsServicer(pb_grpc.EmbeddingsServicer):
    def __init__(self, deps: Deps, edits: EditsServicer) -> None:
        self.deps = deps
        self._edits = edits

    def _model(self, target: pb.ModelRef) -> LoadedModel:
        which = target.WhichOneof("ref")
        if which == "edit":
            return self._edits.edited_model(target.edit, "target.edit")[2]
        return self.deps.runtime.get(validate.text(target.model, "target.model"), "target.model").loaded

    @staticmethod
    def _pixels(loaded: LoadedModel, images) -> object:
        validate.count(images, "images", 1, MAX_IMAGES)
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
        validate.count(request.texts, "texts", 1, MAX_TEXTS)
        for i, t in enumerate(request.texts):
            validate.text(t, f"texts[{i}]", 10_000)
        loaded = self._model(request.target)
        out = runtime.embed_texts(loaded, request.texts, request.normalize)
        return pb.EmbedResponse(embeddings=convert.tensor(out), model_hash=loaded.hash)

    def Classify(self, request, context):
        validate.count(request.labels, "labels", 2, MAX_LABELS)
        for i, label in enumerate(request.labels):
            if not label.strip():
                raise InvalidInput(f"labels[{i}]", "empty label")
            validate.text(label, f"labels[{i}]", 200)
        template = validate.text(request.template, "template", 500) or DEFAULT_TEMPLATE
        if "{}" not in template:
            raise InvalidInput("template", "must contain '{}' where the label goes")
        loaded = self._model(request.target)
        probs = runtime.classify(loaded, self._pixels(loaded, request.images), request.labels, template)
        predicted = [request.labels[int(i)] for i in probs.argmax(dim=-1)]
        return pb.ClassifyResponse(probabilities=convert.tensor(probs), predicted=predicted)
