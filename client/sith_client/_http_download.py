"""The fast path of ``download``: a signed URL from ``GetDownloadUrl`` fetched with plain HTTP(S).

The server hands out a short-lived URL bound to the caller's tenant and edit (no bearer token
travels with it) and serves the file with ``sendfile``; this module streams it into an
:class:`~sith_client._download.AtomicDownload` through one preallocated buffer (``readinto``, no
per-chunk ``bytes``), resuming with ``Range`` after a dropped connection. Anything unexpected
(refused connection, 403 for an expired URL, 5xx, a different checkpoint) raises
:class:`HttpUnavailable`, and the caller continues over the gRPC stream from the bytes already
written, so the HTTP path can only make a download faster, never make it fail.
Standard library only (``http.client``): no extra dependency.
"""

from __future__ import annotations

import http.client
import ssl
from urllib.parse import urlsplit

from ._download import AtomicDownload

BUFFER = 4 << 20       # bytes per readinto (one buffer for the whole download)
ATTEMPTS = 3           # connections tried (the first, then resumes) before giving up on HTTP
UNSPECIFIED = {"0.0.0.0", "::", ""}


class HttpUnavailable(Exception):
    """The HTTP path cannot finish this download; fall back to the gRPC stream."""


def _host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def resolve(url: str, grpc_address: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of ``url``; an unspecified host becomes the gRPC target's host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.port is None:
        raise HttpUnavailable(f"unusable download URL scheme/port: {parts.scheme!r}")
    host = parts.hostname or ""
    if host in UNSPECIFIED:
        host = _host_of(grpc_address)
    return parts.scheme, host, parts.port, parts.path + ("?" + parts.query if parts.query else "")


def fetch(url: str, d: AtomicDownload, *, grpc_address: str, filename: str, size: int, sha256: str,
          timeout: float, root_certificates: bytes | None = None, server_name: str | None = None) -> None:
    """Write the checkpoint at ``url`` into ``d`` (begun here with the announced file), resuming on drops.

    Raises HttpUnavailable when HTTP cannot complete it; ``d.written`` then says how far it got.
    """
    scheme, host, port, target = resolve(url, grpc_address)
    if scheme == "https":
        if server_name:                      # http.client verifies against the host it dials
            raise HttpUnavailable("a TLS server-name override is only supported over gRPC")
        context = ssl.create_default_context(cadata=root_certificates.decode() if root_certificates else None)
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    d.begin(filename=filename, total_bytes=size, sha256=sha256)
    for _ in range(ATTEMPTS):
        if d.written >= size:
            return
        conn = (http.client.HTTPSConnection(host, port, timeout=timeout, context=context) if scheme == "https"
                else http.client.HTTPConnection(host, port, timeout=timeout))
        try:
            headers = {"Range": f"bytes={d.written}-"} if d.written else {}
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            expected = 206 if d.written else 200
            if response.status != expected:
                raise HttpUnavailable(f"HTTP {response.status} {response.reason}")
            if (response.getheader("X-Sith-Sha256") or "").lower() != sha256.lower():
                raise HttpUnavailable("the URL serves another checkpoint than GetDownloadUrl announced")
            if d.written and not (response.getheader("Content-Range") or "").startswith(f"bytes {d.written}-"):
                raise HttpUnavailable("the server answered another range than asked")
            while True:
                n = response.readinto(view)
                if not n:
                    break
                d.write(view[:n])
        except (OSError, http.client.HTTPException):
            continue                         # dropped: resume from d.written
        finally:
            conn.close()
    if d.written < size:
        raise HttpUnavailable(f"HTTP download stopped at {d.written} of {size} bytes")
