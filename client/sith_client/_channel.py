"""Where and how to connect: address, bearer token, TLS, channel options.

Resolved once per client from arguments first, then environment (``SITH_ADDRESS``, ``SITH_TOKEN``,
``SITH_ROOT_CERTS``), so the same script runs against a laptop and a cluster unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from . import __version__

DEFAULT_ADDRESS = "localhost:50051"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

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
        address = address or os.environ.get("SITH_ADDRESS") or DEFAULT_ADDRESS
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
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
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
