"""Edit downloads over signed HTTP URLs (sith_server.downloads): signatures, expiry, tenants, Range, sha256, SDK.

Real server, real Redis, real sockets; expiry is tested with an explicit clock (no sleeps).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from server_support import WORDS, shared_redis_url, tiny_model_folder

import sith_client
from sith_api.v1 import sith_pb2 as pb
from sith_api.v1 import sith_pb2_grpc as pb_grpc
from sith_client._download import AtomicDownload
from sith_client._http_download import HttpUnavailable, fetch
from sith_client.errors import NotFound, Unavailable
from sith_server.app import build
from sith_server.config import ServerConfig
from sith_server.downloads import Signer, parse_range
from sith_server.vocabulary import Vocabulary
from sith_workers.connection import connect
from sith_workers.edits import EditStore

ALICE = [("authorization", "Bearer alice-token")]
BOB = [("authorization", "Bearer bob-token")]
SIZE = 3 * 2**20 + 12345                     # not a multiple of any buffer size


# ---- signatures and ranges (no server) -----------------------------------------------------------

def test_signature_is_bound_to_tenant_edit_and_expiry() -> None:
    signer = Signer(b"k" * 32)
    edit, other = "a" * 32, "b" * 32
    sig = signer.sign("alice", edit, 1000)
    assert signer.verify("alice", edit, "1000", sig, now=999)
    assert signer.verify("alice", edit, "1000", sig, now=1000)
    assert not signer.verify("alice", edit, "1000", sig, now=1001)          # expired
    assert not signer.verify("bob", edit, "1000", sig, now=0)               # another tenant
    assert not signer.verify("alice", other, "1000", sig, now=0)            # another edit
    assert not signer.verify("alice", edit, "1001", sig, now=0)             # a longer life, self-granted
    tampered = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    assert not signer.verify("alice", edit, "1000", tampered, now=0)
    assert not signer.verify("alice", edit, "-5", sig, now=0)
    assert not signer.verify("alice", edit, "", "", now=0)
    assert not Signer(b"x" * 32).verify("alice", edit, "1000", sig, now=0)  # another server's secret


def test_range_parsing() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-", 100) == (0, 100)
    assert parse_range("bytes=10-19", 100) == (10, 20)
    assert parse_range("bytes=90-500", 100) == (90, 100)
    assert parse_range("bytes=-30", 100) == (70, 100)
    assert parse_range("bytes=100-", 100) == "bad"
    assert parse_range("bytes=20-10", 100) == "bad"
    assert parse_range("bytes=0-1,5-6", 100) is None      # multi-range: the whole file
    assert parse_range("items=0-1", 100) is None


# ---- a real server with the endpoint on ----------------------------------------------------------

@contextmanager
def serving(root: Path, *, download_port: int | None = 0, ttl: int = 300, **config_kwargs):
    tokens = root / "tokens"
    tokens.write_text("alice-token alice\nbob-token bob\n")
    prefix = f"sithtest-{uuid.uuid4().hex[:10]}"
    config = ServerConfig(grpc_address="127.0.0.1:0", metrics_port=0, redis_url=shared_redis_url(),
                          auth_tokens_file=tokens, models=(str(tiny_model_folder(root / "tiny")),),
                          data_dir=root / "data", download_port=download_port, download_url_ttl_s=ttl,
                          **config_kwargs)
    server = build(config, prefix=prefix, vocabulary=Vocabulary(WORDS)).start()
    try:
        yield server, prefix
    finally:
        server.stop(grace=1)
        client = connect(config.redis_url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


def ready_edit(server, prefix: str, tenant: str, data: bytes) -> str:
    """A READY edit of ``tenant`` whose artifact holds ``data`` (written as a worker would)."""
    store = EditStore(server.deps.redis, prefix)
    edit_id = store.new_id()
    store.create(tenant, edit_id, pb.EditSpec(), server.deps.runtime.default.loaded.hash)
    store.attach_job(tenant, edit_id, "job")
    path = Path(server.config.data_dir) / "edits" / tenant / f"{edit_id}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    store.ready(tenant, edit_id, pb.EditPlan(), b"", pb.Artifact(
        filename=path.name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()), str(path))
    return f"tenants/{tenant}/edits/{edit_id}"


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, parts.path + ("?" + parts.query if parts.query else ""), headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dlhttp")
    with serving(root) as (server, prefix):
        data = {t: os.urandom(SIZE) for t in ("alice", "bob")}
        names = {t: ready_edit(server, prefix, t, data[t]) for t in data}
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        yield server, pb_grpc.EditsStub(channel), names, data
        channel.close()


def url_for(stub, name: str, metadata) -> pb.DownloadUrl:
    return stub.GetDownloadUrl(pb.GetDownloadUrlRequest(name=name), metadata=metadata, timeout=10)


def test_signed_url_serves_the_file_with_its_sha256(env) -> None:
    server, stub, names, data = env
    offer = url_for(stub, names["alice"], ALICE)
    assert offer.url.startswith(f"http://127.0.0.1:{server.deps.downloads.port}/v1/tenants/alice/edits/")
    assert offer.artifact.size_bytes == SIZE and offer.artifact.sha256 == hashlib.sha256(data["alice"]).hexdigest()
    assert time.time() < offer.expire_time.seconds <= time.time() + 301
    status, headers, body = get(offer.url)
    assert status == 200 and body == data["alice"]
    assert headers["content-length"] == str(SIZE) and headers["accept-ranges"] == "bytes"
    assert headers["x-sith-sha256"] == hashlib.sha256(body).hexdigest()
    status, headers, body = get(offer.url, method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == str(SIZE)
    registry = server.deps.metrics.registry            # the endpoint's answers reach /metrics (counted
    #                                                    before the client sees them; bytes once sent)
    assert registry.get_sample_value("sith_http_downloads_total", {"status": "200"}) >= 2


def test_range_requests_resume(env) -> None:
    _, stub, names, data = env
    url = url_for(stub, names["alice"], ALICE).url
    status, headers, body = get(url, {"Range": "bytes=1000000-"})
    assert status == 206 and body == data["alice"][1_000_000:]
    assert headers["content-range"] == f"bytes 1000000-{SIZE - 1}/{SIZE}"
    status, _, body = get(url, {"Range": "bytes=10-19"})
    assert status == 206 and body == data["alice"][10:20]
    status, _, body = get(url, {"Range": "bytes=-7"})
    assert status == 206 and body == data["alice"][-7:]
    status, headers, _ = get(url, {"Range": f"bytes={SIZE}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{SIZE}"


def test_tampered_wrong_tenant_and_expired_urls_are_refused(env) -> None:
    server, stub, names, data = env
    url = url_for(stub, names["alice"], ALICE).url
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    base = f"{parts.scheme}://{parts.netloc}"
    sig, expires = query["sig"][0], query["expires"][0]
    bob_id = names["bob"].rpartition("/")[2]
    alice_id = names["alice"].rpartition("/")[2]
    refused = [
        f"{base}{parts.path}?expires={expires}&sig={sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}",   # tampered sig
        f"{base}{parts.path}?expires={int(expires) + 3600}&sig={sig}",                                # longer life
        f"{base}/v1/tenants/bob/edits/{alice_id}:download?expires={expires}&sig={sig}",               # other tenant
        f"{base}/v1/tenants/alice/edits/{bob_id}:download?expires={expires}&sig={sig}",               # other edit
        f"{base}/v1/tenants/bob/edits/{bob_id}:download?expires={expires}&sig={sig}",                 # both
        f"{base}{parts.path}",                                                                        # unsigned
    ]
    for bad in refused:
        status, _, body = get(bad)
        assert status == 403 and body == b"forbidden\n", bad
    # A correctly signed URL whose expiry has passed (signed by the server's own key, in the past).
    expired = base + server.deps.downloads.signer.path("alice", alice_id, int(time.time()) - 1)
    assert get(expired)[0] == 403
    # Signed, unexpired, but for an edit that does not exist: 404 (the signature is checked first).
    missing = base + server.deps.downloads.signer.path("alice", "c" * 32, int(time.time()) + 60)
    assert get(missing)[0] == 404
    assert get(f"{base}/metrics")[0] == 404
    refusals = server.deps.metrics.registry.get_sample_value("sith_http_downloads_total", {"status": "403"})
    assert refusals >= len(refused) + 1
    # Bob cannot even obtain a URL for Alice's edit.
    with pytest.raises(grpc.RpcError) as err:
        url_for(stub, names["alice"], BOB)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_sdk_downloads_over_http_and_resumes_with_range(env, tmp_path: Path) -> None:
    server, stub, names, data = env
    address = f"127.0.0.1:{server.port}"
    endpoint = server.deps.downloads
    with sith_client.Client(address, token="alice-token") as client:
        before = endpoint.served
        path = client.download(names["alice"], tmp_path / "a.safetensors")
        assert path.read_bytes() == data["alice"] and endpoint.served == before + 1     # HTTP served it
        path = client.download(names["alice"], tmp_path / "g.safetensors", transport="grpc")
        assert path.read_bytes() == data["alice"] and endpoint.served == before + 1     # gRPC did
        with pytest.raises(NotFound):
            client.download(names["bob"], tmp_path / "b.safetensors")
    # Resume: half the file is already written; fetch asks for the rest with Range.
    offer = url_for(stub, names["alice"], ALICE)
    half = SIZE // 2
    with AtomicDownload(tmp_path / "r.safetensors") as d:
        d.begin(filename=offer.artifact.filename, total_bytes=SIZE, sha256=offer.artifact.sha256)
        d.write(data["alice"][:half])
        fetch(offer.url, d, grpc_address=address, filename=offer.artifact.filename, size=SIZE,
              sha256=offer.artifact.sha256, timeout=30)
        assert d.commit().read_bytes() == data["alice"]
    # A URL that announces another checkpoint than the one served is not trusted.
    with AtomicDownload(tmp_path / "x.safetensors") as d, pytest.raises(HttpUnavailable):
        fetch(offer.url, d, grpc_address=address, filename=offer.artifact.filename, size=SIZE,
              sha256="0" * 64, timeout=30)


def test_unspecified_host_means_the_grpc_host() -> None:
    from sith_client._http_download import resolve

    assert resolve("http://0.0.0.0:8080/v1/x?sig=1", "sith.example:50051") == ("http", "sith.example", 8080,
                                                                               "/v1/x?sig=1")
    assert resolve("https://[::]:8443/p", "[::1]:50051") == ("https", "::1", 8443, "/p")
    assert resolve("http://files.example:80/p", "sith:1")[1] == "files.example"


def test_without_the_endpoint_the_sdk_uses_the_grpc_stream(tmp_path: Path) -> None:
    with serving(tmp_path, download_port=None) as (server, prefix):
        data = os.urandom(SIZE)
        name = ready_edit(server, prefix, "alice", data)
        with sith_client.Client(f"127.0.0.1:{server.port}", token="alice-token") as client:
            offer = client._call(client._edits.GetDownloadUrl, pb.GetDownloadUrlRequest(name=name))
            assert offer.url == "" and offer.artifact.size_bytes == SIZE
            assert client.download(name, tmp_path / "a.safetensors").read_bytes() == data
            with pytest.raises(Unavailable):
                client.download(name, tmp_path / "h.safetensors", transport="http")


def test_async_sdk_downloads_over_http(env, tmp_path: Path) -> None:
    import asyncio

    server, _, names, data = env
    endpoint = server.deps.downloads

    async def go() -> Path:
        async with sith_client.AsyncClient(f"127.0.0.1:{server.port}", token="bob-token") as client:
            return await client.download(names["bob"], tmp_path / "b.safetensors", transport="http")

    before = endpoint.served
    assert asyncio.run(go()).read_bytes() == data["bob"] and endpoint.served == before + 1


def test_with_tls_the_endpoint_serves_https(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with serving(tmp_path, tls_cert=cert, tls_key=key) as (server, prefix):
        data = os.urandom(SIZE)
        name = ready_edit(server, prefix, "alice", data)
        with sith_client.Client(f"127.0.0.1:{server.port}", token="alice-token", root_certificates=cert) as client:
            offer = client._call(client._edits.GetDownloadUrl, pb.GetDownloadUrlRequest(name=name))
            assert offer.url.startswith("https://127.0.0.1:")
            path = client.download(name, tmp_path / "a.safetensors", transport="http")
            assert path.read_bytes() == data and server.deps.downloads.served == 1
        with pytest.raises((OSError, http.client.HTTPException)):
            get(offer.url.replace("https://", "http://"))      # plaintext against the TLS port


def test_idle_connections_are_capped_and_transfers_still_run(tmp_path: Path) -> None:
    import socket

    from sith_server.config import Limits

    with serving(tmp_path, limits=Limits(max_streams=2, max_streams_per_tenant=1)) as (server, prefix):
        endpoint = server.deps.downloads
        cap = endpoint.httpd.max_connections
        assert cap == 8
        data = os.urandom(SIZE)
        name = ready_edit(server, prefix, "alice", data)
        idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) for _ in range(cap)]
        try:
            extra = socket.create_connection(("127.0.0.1", endpoint.port), timeout=10)
            assert extra.recv(1) == b""                       # closed on accept: no thread for it
            extra.close()
        finally:
            for s in idle:
                s.close()
        with sith_client.Client(f"127.0.0.1:{server.port}", token="alice-token") as client:
            # The idle sockets' threads end on EOF and give their slots back; whichever transport gets
            # there first (HTTP, or gRPC if HTTP is still refused), the download completes, verified.
            assert client.download(name, tmp_path / "a.safetensors").read_bytes() == data


def test_config_reads_the_download_variables() -> None:
    from sith.engine.errors import InvalidInput

    off = ServerConfig.from_env({})
    assert off.download_port is None and off.download_secret is None and off.download_url_ttl_s == 300
    on = ServerConfig.from_env({"SITH_DOWNLOAD_PORT": "0", "SITH_DOWNLOAD_HOST": "127.0.0.2",
                                "SITH_DOWNLOAD_URL_BASE": "https://files.example:8443", "SITH_DOWNLOAD_SECRET": "s3",
                                "SITH_DOWNLOAD_URL_TTL_S": "60", "SITH_GRPC_ADDRESS": "0.0.0.0:1"})
    assert (on.download_port, on.download_bind, on.download_base_url, on.download_secret, on.download_url_ttl_s) == \
        (0, "127.0.0.2", "https://files.example:8443", b"s3", 60)
    assert "s3" not in repr(on)
    with pytest.raises(InvalidInput):
        ServerConfig.from_env({"SITH_DOWNLOAD_PORT": "http"})
    with pytest.raises(InvalidInput):
        ServerConfig.from_env({"SITH_DOWNLOAD_URL_TTL_S": "1"})


def test_public_base_url_is_what_clients_are_told() -> None:
    from sith_server.downloads import DownloadEndpoint

    endpoint = DownloadEndpoint(None, host="127.0.0.1", port=0, signer=Signer(b"k"), ttl_s=60,
                                base_url="https://files.example:8443/")
    try:
        url, expires = endpoint.url("alice", "a" * 32, now=1000)
        assert expires == 1060
        assert url == "https://files.example:8443" + Signer(b"k").path("alice", "a" * 32, 1060)
        parts = urlsplit(url)
        assert endpoint.signer.verify("alice", "a" * 32, parse_qs(parts.query)["expires"][0],
                                      parse_qs(parts.query)["sig"][0], now=1000)
    finally:
        endpoint.stop()
