"""Exported checkpoints over plain HTTP(S): short-lived signed URLs and the endpoint that serves them.

Why: gRPC Python moves a large artefact through several copies per message (serialise, HTTP/2
framing, deserialise); over loopback on the 2-core benchmark machine it tops out near 15-20 % of a
page-cache read of the same file even with pre-encoded 4-8 MiB messages and no protobuf work at
all (benchmarks/RESULTS.md). The pattern services use for large artefacts instead: the API hands
out a URL that is valid for a few minutes, for one tenant's one edit, and a small HTTP endpoint
serves the file with ``socket.sendfile`` (the kernel copies page cache to socket), ``Range`` for
resume and the sha256 in a header. ``DownloadEdit`` stays as the fallback.

Security:

* the URL carries ``expires`` (unix seconds) and ``sig`` = HMAC-SHA256(secret, "v1", tenant,
  edit id, expires), URL-safe base64. The secret is ``SITH_DOWNLOAD_SECRET`` (shared by replicas
  behind one address) or 32 random bytes per process (URLs then die with the process);
* verification recomputes the MAC and compares in constant time (``hmac.compare_digest``) before
  anything else is looked up, then checks the expiry, then reads the edit record *of the tenant
  named in the signed path* (a URL cannot be re-pointed at another tenant or edit: the path is
  what is signed);
* every failure answers 403 (or 404 for a signed URL whose edit is gone) with a fixed body, so the
  endpoint tells an unauthenticated caller nothing;
* with TLS configured on the server, the endpoint serves HTTPS with the same certificate;
* at most ``max_streams`` transfers run at once (503 beyond), at most 4 × that many connections are
  open (more are closed on accept, before any thread is started), each socket has a 60 s timeout,
  and only GET and HEAD are served.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

log = logging.getLogger(__name__)

VERSION = b"sith-download-v1"
DEFAULT_TTL_S = 300
SOCKET_TIMEOUT_S = 60.0
_PATH = re.compile(r"/v1/tenants/([^/]{1,200})/edits/([0-9a-f]{32}):download")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class Signer:
    """HMAC-SHA256 signatures bound to (tenant, edit id, expiry)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._key = secret if secret else os.urandom(32)

    def sign(self, tenant: str, edit_id: str, expires: int) -> str:
        message = b"\n".join((VERSION, tenant.encode(), edit_id.encode(), str(int(expires)).encode()))
        mac = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def verify(self, tenant: str, edit_id: str, expires: str, sig: str, now: float | None = None) -> bool:
        """True if ``sig`` signs exactly this tenant, edit and expiry, and the expiry has not passed."""
        if not expires.isdigit() or len(expires) > 12 or len(sig) > 100:
            return False
        good = hmac.compare_digest(self.sign(tenant, edit_id, int(expires)).encode(), sig.encode())
        return good and int(expires) >= (time.time() if now is None else now)

    def path(self, tenant: str, edit_id: str, expires: int) -> str:
        """The signed path and query of one edit's download."""
        return (f"/v1/tenants/{quote(tenant, safe='')}/edits/{edit_id}:download"
                f"?expires={int(expires)}&sig={self.sign(tenant, edit_id, expires)}")


@dataclass
class Served:
    """What one GET resolves to."""

    path: str
    size: int
    sha256: str
    filename: str


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end exclusive) of a single ``bytes=`` range; None for no/ignored header; "bad" if unsatisfiable.

    Multi-range requests are answered with the whole file (allowed by RFC 9110)."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:                          # suffix: the last N bytes
        n = int(last)
        if n == 0:
            return "bad"
        return max(0, size - n), size
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if start >= size or end <= start:
        return "bad"
    return start, end


class DownloadEndpoint:
    """A threaded HTTP(S) server in the API server's process serving signed edit downloads."""

    def __init__(self, edits, *, host: str, port: int, signer: Signer, max_streams: int = 16,
                 ttl_s: int = DEFAULT_TTL_S, base_url: str | None = None, tls: tuple[Path, Path] | None = None,
                 on_served=None) -> None:
        self.edits = edits
        self.signer = signer
        self.ttl_s = ttl_s
        self._slots = threading.BoundedSemaphore(max_streams)
        # on_served(status, 0) when an answer starts, on_served(None, nbytes) when a body has been sent
        self._on_served = on_served or (lambda status, nbytes: None)
        self.served = 0                      # completed transfers (tests and metrics read it)
        endpoint = self

        class Handler(_Handler):
            owner = endpoint

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("SithDownloadHTTPServer", (_QuietServer,),
                          {"address_family": family, "max_connections": max(8, 4 * max_streams)})
        self.httpd = server_cls((host, port), Handler)
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(certfile=str(tls[0]), keyfile=str(tls[1]))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
            self.scheme = "https"
        self.host = host
        self.port = self.httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = (base_url or f"{self.scheme}://{shown}:{self.port}").rstrip("/")
        self._thread: threading.Thread | None = None

    def url(self, tenant: str, edit_id: str, now: float | None = None) -> tuple[str, int]:
        """A signed URL for ``tenant``'s edit and its expiry (unix seconds)."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        return self.base_url + self.signer.path(tenant, edit_id, expires), expires

    def start(self) -> DownloadEndpoint:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="sith-download-http", daemon=True)
        self._thread.start()
        log.info("edit downloads over %s on port %d", self.scheme, self.port)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()

    def resolve(self, raw_path: str) -> Served | int:
        """The file a request path names, or the HTTP status to refuse it with."""
        parts = urlsplit(raw_path)
        match = _PATH.fullmatch(parts.path)
        if match is None:
            return 404
        tenant, edit_id = unquote(match.group(1)), match.group(2)
        query = parse_qs(parts.query, max_num_fields=4)
        expires, sig = query.get("expires", [""])[0], query.get("sig", [""])[0]
        if not self.signer.verify(tenant, edit_id, expires, sig):
            return 403
        record = self.edits.get(tenant, edit_id)
        if record is None or record.state != "ready" or not record.path:
            return 404
        artifact = record.edit.artifact
        return Served(record.path, int(artifact.size_bytes), artifact.sha256, artifact.filename)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    max_connections = 64                 # open connections (one thread each); beyond: closed at once

    def server_activate(self) -> None:
        super().server_activate()
        self._connections = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address) -> None:
        """One thread per connection, but never more than ``max_connections``: anyone can connect
        before a signature is checked, so idle sockets must not be able to pile up threads."""
        if not self._connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-transfer is routine (it resumes with Range): log, don't print."""
        log.debug("download connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    owner: DownloadEndpoint
    server_version = "sith-download"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("download %s - %s", self.address_string(), format % args)

    def _refuse(self, status: int, extra: dict[str, str] | None = None) -> None:
        self.owner._on_served(status, 0)     # counted before the client can see the answer
        body = {403: b"forbidden\n", 404: b"not found\n", 416: b"range not satisfiable\n",
                503: b"busy, retry\n"}.get(status, b"error\n")
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        found = self.owner.resolve(self.path)
        if isinstance(found, int):
            self._refuse(found)
            return
        if not self.owner._slots.acquire(blocking=False):
            self._refuse(503, {"Retry-After": "1"})
            return
        try:
            self._send(found)
        finally:
            self.owner._slots.release()

    def _send(self, found: Served) -> None:
        try:
            handle = open(found.path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            self._refuse(404)
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size != found.size:           # rewritten or truncated under us: never serve a mismatch
                self._refuse(404)
                return
            wanted = parse_range(self.headers.get("Range"), size)
            if wanted == "bad":
                self._refuse(416, {"Content-Range": f"bytes */{size}"})
                return
            start, end = wanted if isinstance(wanted, tuple) else (0, size)
            status = 206 if isinstance(wanted, tuple) else 200
            self.owner._on_served(status, 0)     # counted before the client can see the answer
            self.send_response(status)
            if isinstance(wanted, tuple):
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Sith-Sha256", found.sha256)
            self.send_header("ETag", f'"{found.sha256}"')
            self.send_header("Content-Disposition", f'attachment; filename="{quote(found.filename)}"')
            self.send_header("Cache-Control", "private, no-store")
            self.end_headers()
            if self.command == "HEAD" or end == start:
                return
            sent = self.connection.sendfile(handle, start, end - start)
            self.owner.served += 1
            self.owner._on_served(None, sent)
