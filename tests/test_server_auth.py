"""Bearer-token auth on a real server: missing/wrong tokens rejected, tenants isolated."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_support import running_server, tiny_model_folder

from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc

ALICE = [("authorization", "Bearer alice-token")]
BOB = [("authorization", "Bearer bob-token")]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    tokens = root / "tokens"
    tokens.write_text("# token tenant\nalice-token alice\nbob-token bob\n")
    with running_server([str(tiny_model_folder(root / "tiny"))], tokens_file=tokens, data_dir=root / "data") as r:
        yield r


@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer nope")], [("authorization", "alice-token")],
                                      [("authorization", "Bearer ")]])
def test_missing_or_wrong_token_is_unauthenticated(srv, metadata):
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.ModelsStub(srv.channel).ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_streaming_calls_need_a_token_too(srv):
    with pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.EditsStub(srv.channel).DownloadEdit(pb.DownloadEditRequest(name="edits/ab"), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(srv):
    reply = health_pb2_grpc.HealthStub(srv.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_valid_token_is_served(srv):
    reply = pb_grpc.ModelsStub(srv.channel).ListModels(pb.ListModelsRequest(), metadata=ALICE, timeout=5)
    assert len(reply.models) == 1


def test_tenants_see_only_their_own_operations_and_edits(srv):
    analysis = pb_grpc.AnalysisStub(srv.channel)
    operations = pb_grpc.OperationsStub(srv.channel)
    edits = pb_grpc.EditsStub(srv.channel)
    op = analysis.Decompose(pb.DecomposeRequest(layers=[0]), metadata=ALICE, timeout=5)
    assert operations.GetOperation(pb.GetOperationRequest(name=op.name), metadata=ALICE, timeout=5).name == op.name
    for call in (operations.GetOperation, operations.CancelOperation):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.GetOperationRequest(name=op.name) if call is operations.GetOperation
                 else pb.CancelOperationRequest(name=op.name), metadata=BOB, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Identical requests from another tenant never share (dedupe is per tenant).
    op_bob = analysis.Decompose(pb.DecomposeRequest(layers=[0]), metadata=BOB, timeout=5)
    assert op_bob.name != op.name

    spec = pb.EditSpec(operations=[pb.EditOperation(concepts=["dog"], action=pb.EditOperation.SUPPRESS)])
    edit = edits.CreateEdit(pb.CreateEditRequest(spec=spec), metadata=ALICE, timeout=5)
    assert edit.state == pb.Edit.PENDING
    assert [e.name for e in edits.ListEdits(pb.ListEditsRequest(), metadata=ALICE, timeout=5).edits] == [edit.name]
    assert list(edits.ListEdits(pb.ListEditsRequest(), metadata=BOB, timeout=5).edits) == []
    for call, request in ((edits.GetEdit, pb.GetEditRequest(name=edit.name)),
                          (edits.DeleteEdit, pb.DeleteEditRequest(name=edit.name))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=BOB, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert edit.name.startswith("tenants/alice/edits/")
    pixels = pb.Image(tensor=pb.Tensor(shape=[3, 32, 32], data=b"\0" * 4 * 3 * 32 * 32))
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.EmbeddingsStub(srv.channel).EmbedImages(
            pb.EmbedImagesRequest(target=pb.ModelRef(edit=edit.name), images=[pixels]), metadata=BOB, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Bob naming the edit under his own tenant, or by its bare id, finds nothing either.
    for name in (edit.name.replace("tenants/alice/", "tenants/bob/"), edit.name.rpartition("/")[2]):
        with pytest.raises(grpc.RpcError) as err:
            edits.GetEdit(pb.GetEditRequest(name=name), metadata=BOB, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    edits.DeleteEdit(pb.DeleteEditRequest(name=edit.name), metadata=ALICE, timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        edits.GetEdit(pb.GetEditRequest(name=edit.name), metadata=ALICE, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
