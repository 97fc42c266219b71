"""Wrap a gRPC method handler's behaviour, keeping its (de)serialisers and streaming shape.

The interceptors (auth, errors, metrics) all need to run code around the servicer call; a
response-streaming method's work happens while its generator is iterated, so the wrapper must
stay alive across the whole stream, not just the call that returns the generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

# around(call, request, context) -> response; `call` is the original behaviour.
Around = Callable[[Callable[[Any, grpc.ServicerContext], Any], Any, grpc.ServicerContext], Any]
# around_stream(call, request, context) -> iterator of responses.
AroundStream = Callable[[Callable[[Any, grpc.ServicerContext], Iterator[Any]], Any, grpc.ServicerContext],
                        Iterator[Any]]


def wrap(handler: grpc.RpcMethodHandler | None, around: Around,
         around_stream: AroundStream) -> grpc.RpcMethodHandler | None:
    """A copy of ``handler`` whose behaviour runs inside ``around`` (or ``around_stream``)."""
    if handler is None:
        return None
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, factory = kinds[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attr)
    wrapper = around_stream if handler.response_streaming else around

    def wrapped(request, context):
        return wrapper(behavior, request, context)

    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def rejecting(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts every call with ``code``."""

    def abort(_call, _request, context):
        context.abort(code, message)

    def abort_stream(_call, _request, context):
        context.abort(code, message)
        yield  # pragma: no cover - never reached; makes this a generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(lambda _r, context: context.abort(code, message))
    return wrap(handler, abort, abort_stream)


def already_aborted(context: grpc.ServicerContext) -> bool:
    """True when the servicer (or an interceptor) already set a status via context.abort."""
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK
