"""The server under stress: fuzzed requests, a Redis outage, graceful shutdown."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor as d
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import WORDS, running_server, tiny_model_folder

from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_workers.embedded import EmbeddedRedis
from sith_workers.queue import JobQueue

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Codes a well-behaved server may answer a fuzzed request with; UNKNOWN/INTERNAL mean it crashed.
ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("res") / "tiny")


# ---- fuzzing ----------------------------------------------------------------------------------

def _scalar(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy:
    t = field.type
    if t in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_INT64):
        bits = 31 if t == d.FieldDescriptor.TYPE_INT32 else 63
        return st.one_of(st.integers(-6, 6), st.integers(-(2 ** bits), 2 ** bits - 1))
    if t == d.FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.floats(-2, 2), st.floats(allow_nan=True, allow_infinity=True))
    if t == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == d.FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(WORDS + ["", "edits/ab", "operations/00", "{}"]), st.text(max_size=40))
    if t == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == d.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    if t == d.FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    raise AssertionError(field.type)


def messages(descriptor: d.Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Any message of ``descriptor``: every field optional, repeated fields short, depth-limited."""
    cls = pb_message_class(descriptor)
    if depth > 3:
        return st.just(cls())
    fields = {}
    for field in descriptor.fields:
        value = _scalar(field, depth)
        if field.is_repeated:
            value = st.lists(value, max_size=4)
        fields[field.name] = st.one_of(st.none(), value)

    def build(values: dict):
        msg = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                target = getattr(msg, name)
                for item in value:
                    target.add().CopyFrom(item) if field.type == d.FieldDescriptor.TYPE_MESSAGE else target.append(item)
            elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries(fields).map(build)


def pb_message_class(descriptor: d.Descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


METHODS = [(service.name, method) for service in pb.DESCRIPTOR.services_by_name.values()
           for method in service.methods]


@pytest.mark.slow
def test_fuzzed_requests_never_crash_the_server(model_dir, tmp_path):
    with running_server([str(model_dir)], data_dir=tmp_path) as srv:
        stubs = {name: getattr(pb_grpc, f"{name}Stub")(srv.channel) for name in pb.DESCRIPTOR.services_by_name}
        health = health_pb2_grpc.HealthStub(srv.channel)

        @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(st.sampled_from(METHODS).flatmap(
            lambda m: st.tuples(st.just(m), messages(m[1].input_type))))
        def call(case):
            (service, method), request = case
            rpc = getattr(stubs[service], method.name)
            try:
                if method.server_streaming:
                    for _ in rpc(request, timeout=1.0):
                        pass
                else:
                    rpc(request, timeout=10)
            except grpc.RpcError as err:
                assert err.code() in ACCEPTABLE, (method.full_name, request, err.code(), err.details())

        call()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        assert srv.server.deps.metrics.registry.get_sample_value(
            "sith_grpc_requests_total", {"method": "/sith.v1.Models/ListModels", "code": "INTERNAL"}) is None


# ---- Redis outage ----------------------------------------------------------------------------

def test_redis_outage_is_unavailable_fast_and_not_serving(model_dir, tmp_path):
    with EmbeddedRedis() as redis_server:
        with running_server([str(model_dir)], data_dir=tmp_path, redis_url=redis_server.url) as srv:
            analysis = pb_grpc.AnalysisStub(srv.channel)
            analysis.Decompose(pb.DecomposeRequest(layers=[0]), timeout=5)
            redis_server.stop()
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                analysis.Decompose(pb.DecomposeRequest(layers=[1]), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in err.value.details() and "unavailable" in err.value.details()
            assert time.monotonic() - start < 15
            assert not srv.server.health.check_now()
            health = health_pb2_grpc.HealthStub(srv.channel)
            status = {s: health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status
                      for s in ("", "sith.v1.Analysis", "sith.v1.Edits", "sith.v1.Operations",
                                "sith.v1.Models", "sith.v1.Embeddings")}
            assert status == {"": NOT_SERVING, "sith.v1.Analysis": NOT_SERVING, "sith.v1.Edits": NOT_SERVING,
                              "sith.v1.Operations": NOT_SERVING, "sith.v1.Models": SERVING,
                              "sith.v1.Embeddings": SERVING}
            # What needs no Redis keeps working.
            reply = pb_grpc.EmbeddingsStub(srv.channel).EmbedTexts(pb.EmbedTextsRequest(texts=["dog"]), timeout=10)
            assert list(reply.embeddings.shape) == [1, 32]


# ---- graceful shutdown -----------------------------------------------------------------------

def test_graceful_shutdown_goes_not_serving_and_leaves_jobs_queued(model_dir, tmp_path):
    with running_server([str(model_dir)], data_dir=tmp_path) as srv:
        op = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(layers=[0]), timeout=5)
        statuses = []
        watch = health_pb2_grpc.HealthStub(srv.channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)

        def follow():
            try:
                for reply in watch:
                    statuses.append(reply.status)
            except grpc.RpcError:
                pass

        follower = threading.Thread(target=follow)
        follower.start()
        stream = pb_grpc.OperationsStub(srv.channel).WatchOperation(pb.WatchOperationRequest(name=op.name), timeout=30)
        next(stream)
        while not statuses:
            time.sleep(0.01)
        srv.server.stop(grace=1.0)
        follower.join(timeout=10)
        assert statuses[0] == SERVING and NOT_SERVING in statuses
        with pytest.raises(grpc.RpcError):
            list(stream)
        # The in-flight watch was cut by the shutdown, not by the client: the job stays queued.
        record = JobQueue(srv.server.deps.redis, srv.prefix).get(op.name.split("/")[1])
        assert record.state == "queued"
        assert math.isclose(record.progress, 0.0)


def test_open_watches_are_capped_so_threads_stay_free(model_dir, tmp_path):
    with running_server([str(model_dir)], data_dir=tmp_path, max_workers=4) as srv:
        op = pb_grpc.AnalysisStub(srv.channel).Decompose(pb.DecomposeRequest(layers=[0]), timeout=5)
        ops = pb_grpc.OperationsStub(srv.channel)

        def watch():
            stream = ops.WatchOperation(pb.WatchOperationRequest(name=op.name, detach=True), timeout=30)
            next(stream)
            return stream

        streams = [watch(), watch()]
        with pytest.raises(grpc.RpcError) as err:
            watch()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert pb_grpc.ModelsStub(srv.channel).ListModels(pb.ListModelsRequest(), timeout=5).models
        streams.pop().cancel()
        deadline = time.monotonic() + 10
        while True:                       # the server releases the slot once it sees the cancel
            try:
                streams.append(watch())
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        for stream in streams:
            stream.cancel()
