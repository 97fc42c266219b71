"""Where and how to connect: address, bearer token, TLS, channel options.

Resolved once per client from arguments first, then environment (``SITH_ADDRESS``, ``SITH_TOKEN``,
``SITH_ROOT_CERTS``), so the same script runs against a laptop and a cluster unchanged. An address
may carry a scheme: ``grpc://host:port`` (plaintext) or ``grpcs://host:port`` (TLS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from . import __version__
from .errors import invalid_argument

DEFAULT_ADDRESS = "localhost:50051"
# Downloads ask for 8 MiB chunks; requests may carry batches of encoded images (server: 32 MiB).
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
MAX_SEND_BYTES = 32 * 1024 * 1024
SCHEMES = {"grpc": False, "grpcs": True}


def split_scheme(address: str) -> tuple[str, bool | None]:
    """``grpc://h:p`` -> ("h:p", False), ``grpcs://h:p`` -> ("h:p", True), ``h:p`` -> ("h:p", None)."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        return address, None
    if scheme.lower() not in SCHEMES:
        raise invalid_argument("address", f"{address!r}: unknown scheme {scheme!r}; use host:port, grpc://host:port "
                         "or grpcs://host:port")
    rest = rest.rstrip("/")
    if not rest or "/" in rest:
        raise invalid_argument("address", f"{address!r}: expected {scheme}://host:port")
    return rest, SCHEMES[scheme.lower()]

__all__ = ["Connection", "DEFAULT_ADDRESS"]


@dataclass(frozen=True, repr=False)
class Connection:
    """Resolved connection settings. ``repr`` hides the token so it never lands in logs."""

    address: str
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    server_name: str | None = None          # TLS name override, e.g. for a cert issued to "sith"

    @classmethod
    def resolve(
        cls,
        address: str | None = None,
        *,
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | str | Path | None = None,
        server_name: str | None = None,
    ) -> Connection:
        address, scheme_tls = split_scheme(address or os.environ.get("SITH_ADDRESS") or DEFAULT_ADDRESS)
        if scheme_tls is not None:
            if tls is not None and tls != scheme_tls:
                raise ValueError(f"tls={tls} contradicts the address scheme ({'grpcs' if scheme_tls else 'grpc'}://)")
            if scheme_tls is False and root_certificates is not None:
                raise ValueError("root_certificates given with a plaintext grpc:// address")
            tls = scheme_tls
        token = token if token is not None else (os.environ.get("SITH_TOKEN") or None)
        if root_certificates is None and os.environ.get("SITH_ROOT_CERTS"):
            root_certificates = os.environ["SITH_ROOT_CERTS"]
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).expanduser().read_bytes()
        if tls is None:
            tls = root_certificates is not None
        elif not tls and root_certificates is not None:
            raise ValueError("root_certificates given but tls=False")
        return cls(address, token, tls, root_certificates, server_name)

    def __repr__(self) -> str:
        token = "set" if self.token else "none"
        return f"Connection(address={self.address!r}, tls={self.tls}, token={token})"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata. The token is sent as metadata (not call credentials) so it also
        works on plaintext localhost channels, where gRPC refuses call credentials."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [
            ("grpc.primary_user_agent", f"sith-client/{__version__}"),
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            # Reconnect soon after a refused connection so SDK-level retries can succeed
            # once a restarting server is back (gRPC's default first wait is 1 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def channel(self) -> grpc.Channel:
        if self.tls:
            return grpc.secure_channel(self.address, self._credentials(), options=self._options())
        return grpc.insecure_channel(self.address, options=self._options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls:
            return grpc.aio.secure_channel(self.address, self._credentials(), options=self._options())
        return grpc.aio.insecure_channel(self.address, options=self._options())
