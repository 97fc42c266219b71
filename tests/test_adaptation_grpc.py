"""sith.v1.Adaptation end to end: real server, Redis and a worker."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from server_support import TINY_CFG, WORDS, shared_redis_url, tiny_model_folder, worker_thread
from test_server_jobs import response, watch_until_done

from adaptation_fixtures import plant_rank_one
from sith.engine.models import load_model
from sith_api.v1 import adaptation_pb2 as apb
from sith_api.v1 import adaptation_pb2_grpc as apb_grpc
from sith_api.v1 import sith_pb2 as pb
from sith_client.types import similarity_to_numpy
from sith_server.app import build
from sith_server.config import ServerConfig
from sith_server.vocabulary import Vocabulary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    base = tiny_model_folder(root / "base")
    ft = root / "ft"
    ft.mkdir()
    (ft / "open_clip_config.json").write_bytes((base / "open_clip_config.json").read_bytes())
    write = torch.randn(TINY_CFG["vision_cfg"]["width"], generator=torch.Generator().manual_seed(2))
    tuned = plant_rank_one(load_model(str(base)).model, 2, 3, write)
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(ft / "open_clip_model.safetensors"))
    prefix = f"sithtest-{uuid.uuid4().hex[:10]}"
    config = ServerConfig(grpc_address="127.0.0.1:0", metrics_port=0, redis_url=shared_redis_url(),
                          auth_disabled=True, models=(str(base), str(ft)), data_dir=Path("/tmp") / prefix)
    server = build(config, prefix=prefix, vocabulary=Vocabulary(WORDS))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield channel, prefix, server.deps.runtime
    finally:
        channel.close()
        server.stop(grace=1)


def test_delta_and_matching_operations(srv):
    channel, prefix, runtime = srv
    base, ft = (m.loaded.name for m in runtime._models)
    stub = apb_grpc.AdaptationStub(channel)
    with worker_thread(prefix, data_dir=Path("/tmp") / prefix):
        op = stub.AnalyzeDelta(apb.AnalyzeDeltaRequest(base=base, finetuned=ft, layers=[-1], top=2, k=3), timeout=10)
        assert op.metadata.kind == "adapt_delta"
        final = watch_until_done(channel, op.name)[-1]
        assert final.metadata.state == pb.OperationMetadata.SUCCEEDED, final
        report = response(final, apb.DeltaReport)
        top = report.top_heads[0]
        assert (top.layer, top.head) == (2, 3) and top.directions and top.directions[0].positive
        assert report.finetuned.name == ft and [row.layer for row in report.layers] == [2]
        op = stub.MatchHeads(apb.MatchHeadsRequest(model_a=base, model_b=base, layers_a=[0], layers_b=[0], k=3),
                             timeout=10)
        final = watch_until_done(channel, op.name)[-1]
        assert final.metadata.state == pb.OperationMetadata.SUCCEEDED, final
        result = response(final, apb.MatchReport)
        assert result.mean_score == pytest.approx(1.0) and len(result.matches) == 4
        assert result.profile == "relative-capacity"  # unset HeadProfile = the library default
        assert all((m.a.layer, m.a.head) == (m.b.layer, m.b.head) for m in result.matches)
        _check_universality_statistics(result)


def _check_universality_statistics(result: apb.MatchReport) -> None:
    """A model matched with itself: the chance levels, similarity matrix and agreements reach the client."""
    null, shuffle = result.usage_null, result.label_shuffle_null
    assert (null.kind, shuffle.kind) == ("usage", "labels") and null.description and shuffle.description
    assert null.permutations >= 1 and (null.mean, null.std) == (result.null_mean_score, result.null_std)
    assert null.mean < result.mean_score and shuffle.mean < result.mean_score
    # identical models: no permutation reaches the observed mean, so p is its floor 1 / (1 + n)
    assert null.p_value == pytest.approx(1 / (1 + null.permutations))
    assert 0 < shuffle.p_value <= 1 and null.HasField("z") == (null.std > 0)
    sim = similarity_to_numpy(result.similarity)
    assert sim.shape == (4, 4) and [(h.layer, h.head) for h in result.similarity.heads_a] == [(0, h) for h in range(4)]
    assert [(h.layer, h.head) for h in result.similarity.heads_b] == [(0, h) for h in range(4)]
    assert np.diag(sim) == pytest.approx(1.0, abs=1e-3) and result.all_pairs_mean == pytest.approx(sim.mean(), abs=1e-3)
    same = result.agreement.same_layer
    assert result.agreement.HasField("same_layer") and (same.observed, same.pairs, same.agreeing) == (1.0, 4, 4)
    assert 0 < same.p_value <= 1
    # no categories or ground truth were asked for, so those stay unset rather than zero-filled
    assert not any(result.agreement.HasField(f) for f in ("dominant_category", "ground_truth", "ground_truth_relative"))
    assert all(m.truth_a == m.truth_b == "" for m in result.matches)


def test_bad_requests_are_rejected_before_queueing(srv):
    channel, _, runtime = srv
    base = runtime._models[0].loaded.name
    stub = apb_grpc.AdaptationStub(channel)
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    for request, code, text in ((apb.AnalyzeDeltaRequest(base=base), INVALID, "finetuned"),
                                (apb.AnalyzeDeltaRequest(base=base, finetuned=base, layers=[9]), INVALID, "layer 9"),
                                (apb.AnalyzeDeltaRequest(base=base, finetuned=base, k=99), INVALID, "k"),
                                (apb.MatchHeadsRequest(model_a=base, model_b="nope"), NOT_FOUND, "nope"),
                                (apb.MatchHeadsRequest(model_a=base, model_b=base, profile=7), INVALID, "profile")):
        call = stub.AnalyzeDelta if isinstance(request, apb.AnalyzeDeltaRequest) else stub.MatchHeads
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == code and text in info.value.details()
