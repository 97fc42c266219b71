"""A real server on localhost: health, reflection, models, validation errors, embeddings."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from PIL import Image
from server_support import running_server, shared_redis_url, tiny_model_folder

from sith.engine.models import load_model
from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-a")


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    with running_server([str(model_dir)], data_dir=tmp_path_factory.mktemp("data")) as running:
        yield running


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same model loaded in-process, as a user would with open_clip."""
    return load_model(str(model_dir))


def rich(err: grpc.RpcError):
    status = rpc_status.from_call(err)
    out = {}
    for detail in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.ResourceInfo,
                    error_details_pb2.QuotaFailure, pb.Suggestions):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                out[cls.__name__] = msg
    return status, out


def test_health_overall_and_per_service(srv):
    stub = health_pb2_grpc.HealthStub(srv.channel)
    for service in ("", "sith.v1.Models", "sith.v1.Analysis", "sith.v1.Edits", "sith.v1.Embeddings",
                    "sith.v1.Operations", "sith.v1.Adaptation"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="sith.v1.Nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(srv):
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in reply.list_services_response.service}
    assert {"sith.v1.Models", "sith.v1.Analysis", "sith.v1.Edits", "sith.v1.Embeddings",
            "sith.v1.Operations", "sith.v1.Adaptation", "grpc.health.v1.Health"} <= names


def test_list_and_get_models(srv, reference):
    stub = pb_grpc.ModelsStub(srv.channel)
    models = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    assert len(models) == 1
    m = models[0]
    assert (m.name, m.hash, m.layers, m.heads, m.output_dim, m.image_size, m.is_default) == (
        "tiny-a", reference.hash, 3, 4, 32, 32, True)
    assert stub.GetModel(pb.GetModelRequest(model="tiny-a"), timeout=5) == m
    assert stub.GetModel(pb.GetModelRequest(model=m.hash[:12]), timeout=5) == m
    assert stub.GetModel(pb.GetModelRequest(), timeout=5) == m


def test_unknown_model_is_not_found_with_suggestions(srv):
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.ModelsStub(srv.channel).GetModel(pb.GetModelRequest(model="tiny-b"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    status, details = rich(err.value)
    assert status.code == code_pb2.NOT_FOUND
    assert details["ResourceInfo"].resource_name == "tiny-b"
    assert (details["Suggestions"].field, list(details["Suggestions"].values)) == ("model", ["tiny-a"])


@pytest.mark.parametrize("request_, field", [
    (pb.ExplainHeadsRequest(layers=[0, 7]), "layers[1]"),
    (pb.ExplainHeadsRequest(heads=[-5]), "heads[0]"),
    (pb.ExplainHeadsRequest(k=51), "k"),
    (pb.ExplainHeadsRequest(coherence=1.5), "coherence"),
    (pb.ExplainHeadsRequest(method="compp"), "method"),
    (pb.FindConceptRequest(), "concepts"),
    (pb.FindConceptRequest(concepts=["dog", ""]), "concepts[1]"),
    (pb.FindConceptRequest(concepts=["dog"], top=501), "top"),
    (pb.FindConceptRequest(concepts=["dog"] * 17), "concepts"),
    (pb.FindConceptRequest(concepts=["d" * 201]), "concepts[0]"),
    (pb.DecomposeRequest(layers=[3]), "layers[0]"),
    (pb.DecomposeRequest(model="m" * 1001), "model"),
])
def test_invalid_analysis_requests_name_the_field(srv, request_, field):
    stub = pb_grpc.AnalysisStub(srv.channel)
    method = {pb.ExplainHeadsRequest: stub.ExplainHeads, pb.FindConceptRequest: stub.FindConcept,
              pb.DecomposeRequest: stub.Decompose}[type(request_)]
    with pytest.raises(grpc.RpcError) as err:
        method(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, details = rich(err.value)
    assert [v.field for v in details["BadRequest"].field_violations] == [field]


def test_unknown_concept_returns_close_matches(srv):
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.AnalysisStub(srv.channel).FindConcept(pb.FindConceptRequest(concepts=["dgo"]), timeout=5)
    _, details = rich(err.value)
    violation = details["BadRequest"].field_violations[0]
    assert violation.field == "concepts[0]" and "dgo" in violation.description
    assert "did you mean" not in violation.description          # suggestions are data, not prose
    assert details["Suggestions"].field == "concepts[0]" and details["Suggestions"].values[0] == "dog"
    assert details["ErrorInfo"].domain == "sith.v1" and details["ErrorInfo"].metadata["field"] == "concepts[0]"


def test_invalid_edit_spec_names_the_field(srv):
    stub = pb_grpc.EditsStub(srv.channel)
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["dog"], action=pb.EditOperation.AMPLIFY, strength=0.5)])
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateEdit(pb.CreateEditRequest(spec=spec), timeout=5)
    _, details = rich(err.value)
    assert details["BadRequest"].field_violations[0].field == "spec.operations[0].strength"
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["wter"], action=pb.EditOperation.SUPPRESS)])
    with pytest.raises(grpc.RpcError) as err:
        stub.PreviewEdit(pb.PreviewEditRequest(spec=spec), timeout=5)
    _, details = rich(err.value)
    assert details["BadRequest"].field_violations[0].field == "spec.operations[0].concepts[0]"
    assert "water" in details["Suggestions"].values
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["dog"], action=pb.EditOperation.SUPPRESS, anchor="wter")])
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateEdit(pb.CreateEditRequest(spec=spec), timeout=5)
    _, details = rich(err.value)
    assert details["BadRequest"].field_violations[0].field == "spec.operations[0].anchor"
    assert "water" in details["Suggestions"].values
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateEdit(pb.CreateEditRequest(spec=pb.EditSpec()), timeout=5)
    assert rich(err.value)[1]["BadRequest"].field_violations[0].field == "spec.operations"
    # A negative target passes the wire bound (flip aims below 0) and the library checks the action's range.
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["water"], action=pb.EditOperation.SUPPRESS, target=-0.5)])
    with pytest.raises(grpc.RpcError) as err:
        stub.PreviewEdit(pb.PreviewEditRequest(spec=spec), timeout=5)
    violation = rich(err.value)[1]["BadRequest"].field_violations[0]
    assert violation.field == "spec.operations[0].target" and "suppress" in violation.description
    # Every field outside the proto's bounds is named at once.
    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["dog"], strength=11,
                                                    select=pb.Selection(rule=pb.Selection.TOP_N, n=100001))])
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateEdit(pb.CreateEditRequest(spec=spec), timeout=5)
    assert {v.field for v in rich(err.value)[1]["BadRequest"].field_violations} == {
        "spec.operations[0].strength", "spec.operations[0].select.n"}


def test_n_bounds_are_the_same_in_the_proto_and_the_library():
    from sith.edits.spec import MAX_ABS_STRENGTH, MAX_TOP_N

    from sith_api import bounds

    assert bounds.limits(pb.Selection, "n").max == MAX_TOP_N
    # every action's target range fits the wire bound (a flip target is negative)
    target = bounds.limits(pb.EditOperation, "target")
    assert (target.min, target.max) == (-MAX_ABS_STRENGTH, MAX_ABS_STRENGTH)


def test_unknown_operation_and_edit_are_not_found(srv):
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.OperationsStub(srv.channel).GetOperation(pb.GetOperationRequest(name="operations/abc123"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.EditsStub(srv.channel).GetEdit(pb.GetEditRequest(name="edits/../../etc"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name in ("tenants/default/edits/" + "a" * 32, "tenants/other/edits/" + "b" * 32, "c" * 32):
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.EditsStub(srv.channel).GetEdit(pb.GetEditRequest(name=name), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, name
        assert rich(err.value)[1]["ResourceInfo"].resource_name == name


def test_embed_texts_equals_in_process_open_clip(srv, reference):
    texts = ["a photo of a dog", "a red car", "the ocean"]
    stub = pb_grpc.EmbeddingsStub(srv.channel)
    for normalize in (False, True):
        reply = stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts, normalize=normalize), timeout=10)
        got = np.frombuffer(reply.embeddings.data, dtype="<f4").reshape(tuple(reply.embeddings.shape))
        with torch.no_grad():
            want = reference.model.encode_text(reference.tokenizer(texts), normalize=normalize).numpy()
        np.testing.assert_array_equal(got, want)
        assert reply.model_hash == reference.hash


def test_embed_images_equals_in_process_open_clip(srv, reference):
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(png, format="PNG")
    images = [pb.Image(tensor=pb.Tensor(shape=[3, 32, 32], data=p.tobytes())) for p in pixels]
    images.append(pb.Image(encoded=png.getvalue()))
    reply = pb_grpc.EmbeddingsStub(srv.channel).EmbedImages(pb.EmbedImagesRequest(images=images), timeout=10)
    got = np.frombuffer(reply.embeddings.data, dtype="<f4").reshape(tuple(reply.embeddings.shape))
    decoded = reference.preprocess(Image.open(io.BytesIO(png.getvalue())).convert("RGB"))
    batch = torch.cat([torch.from_numpy(pixels), decoded[None]])
    with torch.no_grad():
        want = reference.model.encode_image(batch).numpy()
    np.testing.assert_array_equal(got, want)


def test_classify(srv):
    pixels = np.zeros((3, 32, 32), dtype=np.float32)
    request = pb.ClassifyRequest(images=[pb.Image(tensor=pb.Tensor(shape=[3, 32, 32], data=pixels.tobytes()))],
                                 labels=["dog", "cat", "car"])
    reply = pb_grpc.EmbeddingsStub(srv.channel).Classify(request, timeout=10)
    probs = np.frombuffer(reply.probabilities.data, dtype="<f4").reshape(tuple(reply.probabilities.shape))
    assert probs.shape == (1, 3)
    assert abs(probs.sum() - 1) < 1e-5
    assert reply.predicted == [["dog", "cat", "car"][int(probs.argmax())]]


@pytest.mark.parametrize("image, field", [
    (pb.Image(), "images[0]"),
    (pb.Image(tensor=pb.Tensor(shape=[3, 16, 16], data=b"\0" * 3072)), "images[0].tensor.shape"),
    (pb.Image(tensor=pb.Tensor(shape=[3, 32, 32], data=b"\0" * 12)), "images[0].tensor.data"),
    (pb.Image(encoded=b"not an image"), "images[0].encoded"),
])
def test_bad_images_are_invalid_argument(srv, image, field):
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.EmbeddingsStub(srv.channel).EmbedImages(pb.EmbedImagesRequest(images=[image]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich(err.value)[1]["BadRequest"].field_violations[0].field == field


def test_metrics_count_requests_by_method_and_code(srv):
    metrics = srv.server.deps.metrics
    pb_grpc.ModelsStub(srv.channel).ListModels(pb.ListModelsRequest(), timeout=5)
    value = metrics.registry.get_sample_value(
        "sith_grpc_requests_total", {"method": "/sith.v1.Models/ListModels", "code": "OK"})
    assert value >= 1
    with pytest.raises(grpc.RpcError):
        pb_grpc.ModelsStub(srv.channel).GetModel(pb.GetModelRequest(model="zzz"), timeout=5)
    assert metrics.registry.get_sample_value(
        "sith_grpc_requests_total", {"method": "/sith.v1.Models/GetModel", "code": "NOT_FOUND"}) >= 1
    assert metrics.registry.get_sample_value("sith_model_loads_total", {"kind": "base"}) == 1


@pytest.mark.parametrize("layers, vector, field", [
    ([0, 2], pb.VectorRef(layer=3, head=0, index=0), "spec.operations[0].select.vectors[0].layer"),
    ([1, 2], pb.VectorRef(layer=0, head=0, index=0), "spec.operations[0].select.vectors[0].layer"),  # not edited
    ([0, 2], pb.VectorRef(layer=0, head=4, index=0), "spec.operations[0].select.vectors[0].head"),
    ([0, 2], pb.VectorRef(layer=0, head=0, index=16), "spec.operations[0].select.vectors[0].index"),
    ([0, 2], pb.VectorRef(layer=0, head=-1, index=0), "spec.operations[0].select.vectors[0].head"),
])
def test_explicit_vectors_are_checked_against_the_model(srv, layers, vector, field):
    spec = pb.EditSpec(operations=[pb.EditOperation(
        concepts=["dog"], action=pb.EditOperation.SUPPRESS, layers=layers,
        select=pb.Selection(rule=pb.Selection.EXPLICIT, vectors=[vector]))])
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.EditsStub(srv.channel).PreviewEdit(pb.PreviewEditRequest(spec=spec), timeout=5)
    assert rich(err.value)[1]["BadRequest"].field_violations[0].field == field


def test_operation_target_names_the_model_not_a_server_path(srv):
    op = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(layers=[0]), timeout=5)
    assert op.metadata.target == "tiny-a"
    pb_grpc.OperationsStub(srv.channel).CancelOperation(pb.CancelOperationRequest(name=op.name), timeout=5)


def test_metrics_http_endpoint(model_dir, tmp_path):
    import socket
    import urllib.request

    from sith_server.app import build
    from sith_server.config import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(grpc_address="127.0.0.1:0", metrics_port=port, redis_url=shared_redis_url(),
                          auth_disabled=True, models=(str(model_dir),), data_dir=tmp_path)
    server = build(config, prefix="sithtest-metrics").start()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        assert "sith_model_loads_total" in text and "sith_queue_depth" in text
    finally:
        server.stop(grace=0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
