"""Bearer-token authentication: each token maps to one tenant, and every call runs as that tenant.

Tokens come from a file of ``token tenant`` lines (``#`` comments allowed). Health checks and
reflection stay open so Kubernetes probes and grpcurl work without a token. The tenant is handed
to servicers through a context variable set around the call, so servicers stay plain.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import grpc

from sith.engine.errors import InvalidInput
from sith_server.handlers import rejecting, wrap

DEFAULT_TENANT = "default"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("sith_tenant", default=DEFAULT_TENANT)


def current_tenant() -> str:
    """The tenant of the call being served (``default`` when auth is disabled)."""
    return _TENANT.get()


def read_tokens(path: str | Path) -> dict[str, str]:
    """Parse a tokens file into {token: tenant}."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise InvalidInput("SITH_AUTH_TOKENS_FILE", f"line {number}: expected 'token tenant'")
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise InvalidInput("SITH_AUTH_TOKENS_FILE", f"no tokens in {path}")
    return tokens


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED without a known bearer token; otherwise runs the call as its tenant.

    With ``tokens=None`` (auth disabled) every call runs as the default tenant. Rejections are
    reported to ``on_reject`` (a label-free counter: unauthenticated callers must not be able to
    create metric series by choosing method names).
    """

    def __init__(self, tokens: Mapping[str, str] | None, on_reject: Callable[[str], None] | None = None) -> None:
        self._tokens = dict(tokens) if tokens is not None else None
        self._on_reject = on_reject or (lambda reason: None)

    def _lookup(self, token: str) -> str | None:
        # Compare every token in constant time so timing does not leak which prefix matched.
        found = None
        for known, tenant in self._tokens.items():  # type: ignore[union-attr]
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        return found

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if self._tokens is None:
            return self._as(handler, DEFAULT_TENANT)
        if handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if token is None:
            self._on_reject("unauthenticated")
            return rejecting(handler, grpc.StatusCode.UNAUTHENTICATED,
                             "missing 'authorization: Bearer <token>' metadata")
        tenant = self._lookup(token)
        if tenant is None:
            self._on_reject("unauthenticated")
            return rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
        return self._as(handler, tenant)

    @staticmethod
    def _as(handler, tenant: str):
        def around(call, request, context):
            token = _TENANT.set(tenant)
            try:
                return call(request, context)
            finally:
                _TENANT.reset(token)

        def around_stream(call, request, context) -> Iterator:
            token = _TENANT.set(tenant)
            try:
                yield from call(request, context)
            finally:
                _TENANT.reset(token)

        return wrap(handler, around, around_stream)
