"""What can run here of the containers' pieces: the image health check against a real gRPC
server (plaintext and TLS) and a real Redis, and deploy/redis/redis.conf loaded by a real
redis-server. The images themselves are not built (no Docker engine here)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_support import DEPLOY  # noqa: E402

grpc = pytest.importorskip("grpc")
health = pytest.importorskip("grpc_health.v1.health")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

HEALTHCHECK = DEPLOY / "healthcheck.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True,
                          timeout=30, env={**base, **(env or {})})


@pytest.fixture
def health_server():
    """A gRPC server with the standard health service; yields (port, servicer, start_tls)."""
    started = []

    def start(credentials=None):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = free_port()
        if credentials is None:
            server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            server.add_secure_port(f"127.0.0.1:{port}", credentials)
        server.start()
        started.append(server)
        return port, servicer

    yield start
    for server in started:
        server.stop(None)


def test_grpc_check_serving_and_not(health_server):
    port, servicer = health_server()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    # the listen address in SITH_GRPC_ADDRESS is turned into a loopback dial address
    ok = check("grpc", env={"SITH_GRPC_ADDRESS": f"0.0.0.0:{port}"})
    assert ok.returncode == 0, ok.stderr
    assert "SERVING" in ok.stderr
    servicer.set("sith.v1.Edit", health_pb2.HealthCheckResponse.NOT_SERVING)
    bad = check("grpc", "--address", f"127.0.0.1:{port}", "--service", "sith.v1.Edit")
    assert bad.returncode == 1 and "NOT_SERVING" in bad.stderr
    servicer.enter_graceful_shutdown()
    assert check("grpc", "--address", f"127.0.0.1:{port}").returncode == 1


def test_grpc_check_fails_without_a_server():
    res = check("grpc", "--address", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert res.returncode == 1 and "UNAVAILABLE" in res.stderr


def test_grpc_check_over_tls(health_server, tmp_path):
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,DNS:sith-server",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port, servicer = health_server(creds)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    env = {"SITH_GRPC_ADDRESS": f"0.0.0.0:{port}", "SITH_TLS_CERT": str(cert), "SITH_TLS_KEY": str(key)}
    assert check("grpc", env=env).returncode == 0
    # the name the Kubernetes TLS component uses; a missing CA file falls back to the cert
    env2 = {**env, "SITH_HEALTHCHECK_SERVER_NAME": "sith-server", "SITH_HEALTHCHECK_CA": str(tmp_path / "none")}
    assert check("grpc", env=env2).returncode == 0
    wrong = check("grpc", env={**env, "SITH_HEALTHCHECK_SERVER_NAME": "elsewhere"})
    assert wrong.returncode == 1
    plain = check("grpc", "--timeout", "2", env={"SITH_GRPC_ADDRESS": f"0.0.0.0:{port}"})
    assert plain.returncode == 1, "a plaintext probe must not pass against a TLS port"


@pytest.fixture
def redis_from_deploy_conf(tmp_path):
    """redis-server started from deploy/redis/redis.conf (dir and port moved to the test's own)."""
    server = shutil.which("redis-server")
    if not server:
        pytest.skip("redis-server not installed")
    port = free_port()
    # `dir` is applied while the file is read, so point the one `dir /data` line at tmp_path.
    text = (DEPLOY / "redis" / "redis.conf").read_text()
    assert text.count("\ndir /data\n") == 1
    conf = tmp_path / "redis.conf"
    data = tmp_path / "data"
    data.mkdir()
    conf.write_text(text.replace("\ndir /data\n", f"\ndir {data}\n"))
    proc = subprocess.Popen([server, str(conf), "--port", str(port), "--bind", "127.0.0.1",
                             "--maxmemory", "64mb"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None:
                pytest.fail("redis-server refused deploy/redis/redis.conf:\n" + proc.stdout.read())
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("redis-server did not come up")
            time.sleep(0.1)
    yield port, client, data
    client.shutdown(nosave=True) if proc.poll() is None else None
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_redis_conf_loads_and_persists(redis_from_deploy_conf):
    port, client, data_dir = redis_from_deploy_conf
    cfg = client.config_get("*")
    assert cfg["appendonly"] == "yes"
    assert cfg["appendfsync"] == "everysec"
    assert cfg["maxmemory-policy"] == "volatile-lru"
    assert cfg["save"]  # RDB snapshots on
    # the job stream and a TTL-less edit survive; AOF files appear in the data dir
    client.xgroup_create("sith:jobs", "sith-workers", id="0", mkstream=True)
    client.xadd("sith:jobs", {"kind": "decompose"})
    client.set("sith:edit:test", b"multipliers")
    client.set("sith:artifact:test", b"x", ex=60)
    assert client.ttl("sith:edit:test") == -1
    deadline = time.monotonic() + 10
    while not any(data_dir.rglob("*.aof")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(data_dir.rglob("*.aof")), list(data_dir.rglob("*"))
    res = check("redis", env={"SITH_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert res.returncode == 0 and "PONG" in res.stderr


def test_redis_check_fails_without_redis():
    res = check("redis", "--url", f"redis://127.0.0.1:{free_port()}/0", "--timeout", "1")
    assert res.returncode == 1
    assert check("redis").returncode == 1  # no URL at all


# --------------------------------------------------------------------------- the compose topology, without Docker


def _exposed_series(text: str) -> set[str]:
    # the text format's TYPE line already names a counter with its _total suffix
    suffixes = {"counter": [""], "gauge": [""], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "info": ["_info"], "untyped": [""]}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + s for s in suffixes.get(kind, [""])}
    return names


@pytest.mark.slow
def test_compose_server_and_worker_run_here(redis_from_deploy_conf, tmp_path):
    """`sith serve` with compose's server environment (hosts moved to loopback) and `sith worker`
    with compose's worker command, on a Redis configured by deploy/redis/redis.conf: the image's
    health check sees it SERVING, /metrics exposes every metric the dashboard queries, and both
    stop on SIGTERM within compose's stop_grace_period."""
    import json
    import os
    import signal
    import urllib.request

    from deploy_support import compose, tool

    sith = tool("sith")
    if not sith:
        pytest.skip("the `sith` console script is not installed")
    port, _client, _data = redis_from_deploy_conf
    spec = compose()["services"]
    env = {k: str(v) for k, v in spec["server"]["environment"].items()}
    grpc_port, metrics_port = free_port(), free_port()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("deploy-test-token team-a\n")
    url = f"redis://127.0.0.1:{port}/0"
    assert env["SITH_REDIS_URL"] == "redis://redis:6379/0"
    home = tmp_path / "home"
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "SITH_DATA_DIR": str(home / "sith"), "HF_HUB_OFFLINE": "1"}
    server_env = {**base, **env, "SITH_REDIS_URL": url, "SITH_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
                  "SITH_METRICS_PORT": str(metrics_port), "SITH_AUTH_TOKENS_FILE": str(tokens),
                  "SITH_DATA_DIR": str(home / "sith"), "HF_HOME": str(home / "hf")}
    worker_cmd = [a.replace("redis://redis:6379/0", url) for a in spec["worker-cpu"]["command"]]
    logs = tmp_path / "server.log", tmp_path / "worker.log"
    with open(logs[0], "w") as slog, open(logs[1], "w") as wlog:
        server = subprocess.Popen([sith, "serve"], env=server_env, stdout=slog, stderr=subprocess.STDOUT)
        worker = subprocess.Popen([sith, "worker", *worker_cmd], env={**base, "HF_HOME": str(home / "hf")},
                                  stdout=wlog, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            res = check("grpc", "--timeout", "2", env={"SITH_GRPC_ADDRESS": server_env["SITH_GRPC_ADDRESS"]})
            if res.returncode == 0:
                break
            if server.poll() is not None:
                pytest.fail("sith serve exited:\n" + logs[0].read_text()[-3000:])
            assert time.monotonic() < deadline, "server not SERVING in time:\n" + logs[0].read_text()[-3000:]
            time.sleep(1)
        assert check("grpc", "--address", f"127.0.0.1:{grpc_port}", "--service", "sith.v1.Models").returncode == 0
        assert worker.poll() is None, logs[1].read_text()
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        exposed = _exposed_series(text)
        dash = json.loads((DEPLOY / "grafana/dashboards/sith.json").read_text())
        import re

        queried = {m for p in dash["panels"] for t in p.get("targets", []) for m in re.findall(r"\b(sith_\w+)", t["expr"])}
        assert queried <= exposed, f"dashboard metrics missing from a live /metrics: {sorted(queried - exposed)}"
        if shutil.which("prometheus"):
            _evaluate_dashboard_with_prometheus(tmp_path, metrics_port, grpc_port, dash)
    finally:
        grace = {}
        for name, proc in (("server", server), ("worker", worker)):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in (("server", server), ("worker", worker)):
            start = time.monotonic()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            grace[name] = time.monotonic() - start
    assert server.returncode is not None and grace["server"] < 30, grace  # compose stop_grace_period: 30s


def _evaluate_dashboard_with_prometheus(tmp_path: Path, metrics_port: int, grpc_port: int, dash: dict) -> None:
    """A real Prometheus (Debian's package, when installed) scrapes the live server with
    deploy/prometheus/prometheus.yml (targets moved to loopback) and evaluates every dashboard query."""
    import json
    import urllib.parse
    import urllib.request

    import yaml

    conf = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    prom_port = free_port()
    conf["global"]["scrape_interval"] = "1s"
    for job in conf["scrape_configs"]:
        target = {"sith-server": f"127.0.0.1:{metrics_port}", "prometheus": f"127.0.0.1:{prom_port}"}[job["job_name"]]
        job["static_configs"] = [{"targets": [target]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))

    def query(expr: str) -> dict:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as exc:  # 400 = the query does not parse
            return json.loads(exc.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                up = query('up{job="sith-server"}')["data"]["result"]
                if up and up[0]["value"][1] == "1":
                    break
            except (OSError, KeyError):
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus never scraped the server"
            time.sleep(0.5)
        for _ in range(5):  # some traffic, and enough scrapes for rate()
            check("grpc", "--address", f"127.0.0.1:{grpc_port}")
            time.sleep(1)
        assert query("sum(rate(sith_grpc_requests_total[1m])")["status"] == "error"  # the check can fail
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "1m")
                reply = query(expr)
                assert reply["status"] == "success", (panel["title"], expr, reply.get("error"))
        for expr in ('max(sith_queue_depth{state="queued"})', "max by (state) (sith_workers)",
                     "sum(rate(sith_grpc_requests_total[1m]))"):
            assert query(expr)["data"]["result"], f"no data for {expr}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _start_redis(conf_text: str, data: Path, *extra: str):
    import redis

    port = free_port()
    conf = data.parent / f"redis-{port}.conf"
    conf.write_text(conf_text.replace("\ndir /data\n", f"\ndir {data}\n"))
    proc = subprocess.Popen([shutil.which("redis-server"), str(conf), "--port", str(port), "--bind", "127.0.0.1",
                             "--maxmemory", "64mb", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return proc, client
        except redis.BusyLoadingError:
            time.sleep(0.1)
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)


def _stop_redis(proc, client) -> None:
    try:
        client.shutdown(nosave=True)
    except Exception:  # noqa: BLE001 - the connection drops as it shuts down
        pass
    proc.wait(timeout=20)


def test_backup_and_restore_procedure(tmp_path):
    """deploy/README.md "Backups and restore", step by step, with deploy/redis/redis.conf."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed")
    conf = (DEPLOY / "redis" / "redis.conf").read_text()
    live, restored, naive = tmp_path / "live", tmp_path / "restored", tmp_path / "naive"
    for d in (live, restored, naive):
        d.mkdir()
    # backup: BGSAVE, wait for LASTSAVE to move, copy dump.rdb
    proc, client = _start_redis(conf, live)
    client.hset("sith:edit:team-a:e1", mapping={"multipliers": b"\x00\x01", "manifest": "{}"})
    before = client.lastsave()
    time.sleep(1.1)  # LASTSAVE has one-second resolution
    client.bgsave()
    deadline = time.monotonic() + 20
    while client.lastsave() == before:
        assert time.monotonic() < deadline, "BGSAVE did not finish"
        time.sleep(0.1)
    _stop_redis(proc, client)
    backup = (live / "dump.rdb").read_bytes()

    # the pitfall the README warns about: AOF on + only an RDB = an empty database
    (naive / "dump.rdb").write_bytes(backup)
    proc, client = _start_redis(conf, naive)
    assert not client.exists("sith:edit:team-a:e1")
    _stop_redis(proc, client)

    # the procedure: start with appendonly no, CONFIG SET appendonly yes, restart with the config file
    (restored / "dump.rdb").write_bytes(backup)
    proc, client = _start_redis(conf, restored, "--appendonly", "no")
    assert client.hget("sith:edit:team-a:e1", "multipliers") == b"\x00\x01"
    client.config_set("appendonly", "yes")
    deadline = time.monotonic() + 20
    while client.info("persistence")["aof_rewrite_in_progress"] or not client.info("persistence")["aof_enabled"]:
        assert time.monotonic() < deadline, "AOF rewrite did not finish"
        time.sleep(0.1)
    _stop_redis(proc, client)
    proc, client = _start_redis(conf, restored)
    assert client.hget("sith:edit:team-a:e1", "multipliers") == b"\x00\x01"
    _stop_redis(proc, client)
