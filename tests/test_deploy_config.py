"""deploy/ agrees with the code: environment variables, ports and probes with
sith_server.config.ServerConfig, the Grafana dashboard with the metrics the server and workers
define, the lock with pyproject's pins, and the README's Redis sizing table with its formula."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_support import (  # noqa: E402
    DEPLOY, K8S, ROOT, compose, containers, dockerfile_env, k8s_docs, k8s_find,
)

import sith.cli as cli  # noqa: E402
import sith_server.config as config  # noqa: E402
import sith_server.health as health  # noqa: E402
import sith_server.metrics as metrics  # noqa: E402

ServerConfig = config.ServerConfig

CONFIG_SOURCE = Path(config.__file__).read_text()
# Variables the health check script reads (deploy/healthcheck.py), not the server.
HEALTHCHECK_VARS = {"SITH_HEALTHCHECK_CA", "SITH_HEALTHCHECK_SERVER_NAME"}


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _architecture_vars() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("### Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(SITH_[A-Z0-9_]+)`", table))


def _deploy_env_vars() -> dict[str, set[str]]:
    """Every SITH_* name that a deploy file sets, by file."""
    found: dict[str, set[str]] = {}
    for path in list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.glob("*.Dockerfile")):
        names = set(re.findall(r"\b(SITH_[A-Z0-9_]+)\b", path.read_text()))
        if names:
            found[str(path.relative_to(DEPLOY))] = names
    return found


# --------------------------------------------------------------------------- environment


def test_every_variable_is_one_the_server_reads():
    known = set(re.findall(r'"(SITH_[A-Z0-9_]+)"', CONFIG_SOURCE)) | HEALTHCHECK_VARS
    for where, names in _deploy_env_vars().items():
        assert names <= known, f"{where} sets variables sith_server.config does not read: {names - known}"


def test_every_variable_is_documented():
    documented = _architecture_vars() | HEALTHCHECK_VARS
    assert documented, "docs/architecture.md lost its configuration table"
    readme = (DEPLOY / "README.md").read_text()
    for where, names in _deploy_env_vars().items():
        assert names <= documented, f"{where}: not in docs/architecture.md: {names - documented}"
    for name in _architecture_vars() | HEALTHCHECK_VARS:
        assert f"`{name}`" in readme, f"deploy/README.md's configuration reference misses {name}"


def test_server_config_reads_the_deploy_settings():
    """The environments the deploy files give the server parse, and mean what they should."""
    defaults = ServerConfig.from_env({})
    svc = compose()["services"]["server"]
    env = {k: str(v) for k, v in svc["environment"].items()}
    cfg = ServerConfig.from_env(env)
    assert cfg.redis_url == "redis://redis:6379/0"
    assert cfg.workers == 0, "compose runs workers as their own service"
    assert cfg.auth_tokens_file is not None and not cfg.auth_disabled, "auth stays on in deployments"
    assert _port(cfg.grpc_address) == _port(defaults.grpc_address) == 50051
    assert cfg.metrics_port == defaults.metrics_port == 9464

    cm = k8s_find("ConfigMap", "sith-config")["data"]
    kcfg = ServerConfig.from_env({**cm, "SITH_REDIS_URL": "redis://:pw@redis:6379/0"})
    assert kcfg.workers == 0 and kcfg.auth_tokens_file is not None and not kcfg.auth_disabled
    assert kcfg.metrics_port == defaults.metrics_port
    assert kcfg.cache_ttl_s == defaults.cache_ttl_s
    assert str(kcfg.auth_tokens_file).startswith("/etc/sith/auth/")

    img = dockerfile_env(DEPLOY / "server.Dockerfile")
    # a bare `docker run` must not expose an auth-less embedded server on the network
    assert "SITH_GRPC_ADDRESS" not in img and "SITH_AUTH_DISABLED" not in img
    icfg = ServerConfig.from_env({k: v for k, v in img.items() if k.startswith("SITH_")})
    assert icfg.grpc_address == defaults.grpc_address and icfg.metrics_port == defaults.metrics_port
    wimg = dockerfile_env(DEPLOY / "worker.Dockerfile")
    assert ServerConfig.from_env({k: v for k, v in wimg.items() if k.startswith("SITH_")}).device == "cuda:0"


def test_ports_and_probes_match_the_config():
    defaults = ServerConfig.from_env({})
    grpc_port, metrics_port = _port(defaults.grpc_address), defaults.metrics_port
    # Dockerfiles
    server_df = (DEPLOY / "server.Dockerfile").read_text()
    assert re.search(rf"^EXPOSE .*\b{grpc_port}\b.*\b{metrics_port}\b", server_df, re.M)
    # compose
    svc = compose()["services"]["server"]
    assert f"{grpc_port}:{grpc_port}" in svc["ports"] and str(metrics_port) in svc["expose"]
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["sith-server"]["static_configs"][0]["targets"] == [f"server:{metrics_port}"]
    # Kubernetes: container ports, native gRPC probes, Service
    server = k8s_find("Deployment", "sith-server")
    c = containers(server)[0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
    # liveness must not depend on Redis (a Redis outage would restart every server): it asks for a
    # service the server keeps SERVING while the process is up; readiness asks for the whole server
    assert c["readinessProbe"]["grpc"].get("service", "") == ""
    for probe in ("startupProbe", "livenessProbe"):
        service = c[probe]["grpc"]["service"]
        assert service in health.SERVICES and service in health.LOCAL_SERVICES, (probe, service)
    service = k8s_find("Service", "sith-server")
    sports = {p["name"]: p for p in service["spec"]["ports"]}
    assert sports["grpc"]["port"] == grpc_port and sports["grpc"]["appProtocol"] == "grpc"
    assert sports["metrics"]["port"] == metrics_port
    assert service["spec"]["selector"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
    monitor = k8s_find("ServiceMonitor", "sith-server")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_worker_gets_a_gpu_and_the_queue():
    worker = k8s_find("Deployment", "sith-worker")
    c = containers(worker)[0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
    assert c["args"] == ["--device", "cuda:0"]
    names = [e["name"] for e in c["env"]]
    assert "SITH_REDIS_URL" in names, "sith worker reads --redis from SITH_REDIS_URL"
    assert names.index("REDIS_PASSWORD") < names.index("SITH_REDIS_URL"), "$(VAR) needs VAR defined first"
    so = k8s_find("ScaledObject", "sith-worker")
    assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    for trig in so["spec"]["triggers"]:
        assert trig["type"] == "redis-streams"
        # the job contract: stream sith:jobs, consumer group sith-workers (docs/architecture.md)
        assert trig["metadata"]["stream"] == "sith:jobs"
        assert trig["metadata"]["consumerGroup"] == "sith-workers"
        assert trig["metadata"]["address"].startswith("redis.")
    modes = {k for t in so["spec"]["triggers"] for k in t["metadata"]} & {"lagCount", "pendingEntriesCount"}
    assert modes == {"lagCount", "pendingEntriesCount"}
    gpu = compose()["services"]["worker"]
    assert gpu["command"] == ["--redis", "redis://redis:6379/0", "--device", "auto"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_redis_is_persistent_and_evicts_only_the_cache():
    conf = dict(line.split(None, 1) for line in (DEPLOY / "redis/redis.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["appendonly"] == "yes"
    assert conf["maxmemory-policy"].startswith("volatile-"), "edits and jobs (no TTL) must never be evicted"
    sts = k8s_find("StatefulSet", "redis")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    mounts = {m["name"]: m["mountPath"] for m in containers(sts)[0]["volumeMounts"]}
    assert mounts["data"] == conf["dir"]
    redis_svc = compose()["services"]["redis"]
    assert any(v.endswith(":" + conf["dir"]) for v in redis_svc["volumes"])


def test_secrets_for_tokens_redis_and_tls():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = {s["name"] for s in kust["secretGenerator"]}
    assert {"sith-auth", "sith-redis"} <= generated
    server = containers(k8s_find("Deployment", "sith-server"))[0]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    cm = k8s_find("ConfigMap", "sith-config")["data"]
    assert cm["SITH_AUTH_TOKENS_FILE"].startswith(mounts["auth"] + "/")
    tls = (K8S / "components/tls/kustomization.yaml").read_text()
    assert "SITH_TLS_CERT" in tls and "SITH_TLS_KEY" in tls and "secretName: sith-tls" in tls


def test_cli_accepts_what_the_deploy_files_pass():
    """`sith worker` options used by compose/Kubernetes exist (and --redis reads SITH_REDIS_URL)."""
    worker = cli.main.commands["worker"]
    opts = {o.opts[0]: o for o in worker.params if hasattr(o, "opts")}
    assert "--redis" in opts and "--device" in opts
    assert opts["--redis"].envvar == "SITH_REDIS_URL"
    assert "serve" in cli.main.commands  # the server containers run `sith serve`


# --------------------------------------------------------------------------- metrics


METRIC_DEF = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)(?:MetricFamily)?\(\s*[\"'](sith_\w+)[\"']")
SUFFIXES = {"counter": ["_total", "_created"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count", "_created"],
            "summary": ["", "_sum", "_count", "_created"], "info": ["_info"], "enum": [""]}


def defined_series() -> dict[str, str]:
    """Exposed series name -> defining module, for every metric the server and workers define."""
    series: dict[str, str] = {}
    for module in ("server/sith_server/metrics.py", "workers/sith_workers/metrics.py"):
        path = ROOT / module
        for kind, name in METRIC_DEF.findall(path.read_text()):
            base = name.removesuffix("_total") if kind == "Counter" else name
            for suffix in SUFFIXES[kind.lower()]:
                series[base + suffix] = module
    return series


def dashboard_series() -> set[str]:
    dash = json.loads((DEPLOY / "grafana/dashboards/sith.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"\b(sith_\w+)", e)}


def test_dashboard_uses_only_defined_metrics():
    series = defined_series()
    unknown = dashboard_series() - set(series)
    assert not unknown, f"dashboard queries metrics nobody defines: {sorted(unknown)}"


def test_dashboard_covers_the_required_views():
    used = dashboard_series()
    required = {
        "requests": "sith_grpc_requests_total",
        "latency": "sith_grpc_request_duration_seconds_bucket",
        "queue depth": "sith_queue_depth",
        "cache hit rate": "sith_cache_requests_total",
        "job durations": "sith_job_duration_seconds_bucket",
        "worker utilisation": "sith_workers",
    }
    missing = {view: name for view, name in required.items() if name not in used}
    assert not missing, missing
    series = defined_series()
    assert set(required.values()) <= set(series), set(required.values()) - set(series)


def test_server_registry_exposes_the_dashboard_metrics():
    """Instantiate the server's metrics and collect: the dashboard's server-side names appear."""
    m = metrics.Metrics()
    m.add_redis_collector(lambda: {"queued": 1, "running": 0, "workers_busy": 1, "workers_idle": 1,
                                   "cache_hit": 3, "cache_miss": 1})
    families = {f.name: f.type for f in m.registry.collect()}
    names = set()
    for name, kind in families.items():
        names |= {name + s for s in SUFFIXES.get(kind, [""])}
    for needed in ("sith_grpc_requests_total", "sith_grpc_request_duration_seconds_bucket",
                   "sith_queue_depth", "sith_workers", "sith_cache_requests_total",
                   "sith_job_duration_seconds_bucket"):
        assert needed in names, (needed, sorted(names))


# --------------------------------------------------------------------------- lock and sizing


def test_constraints_pin_what_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version
    for dep in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ \[;]", dep, 1)[0]).lower()
        assert name in lock, f"{name} missing from deploy/constraints.txt: run deploy/tools/lock.py"
        if "==" in dep:
            pinned = dep.split("==", 1)[1].split(";")[0].strip()
            assert lock[name] == pinned, f"{name}: lock {lock[name]} != pyproject {pinned}; run deploy/tools/lock.py"


def decomposition_bytes(d: int, r: int, layers: int, heads: int) -> int:
    """U [d,r], S [r], V [d,r] per head, fp32."""
    return layers * heads * (2 * d * r + r) * 4


def test_readme_sizing_table_matches_the_formula():
    readme = (DEPLOY / "README.md").read_text()
    for label, d, r, layers, heads in [("ViT-B/32", 768, 64, 12, 12), ("ViT-L/14", 1024, 64, 24, 16),
                                       ("ViT-H/14", 1280, 80, 32, 16)]:
        mib = decomposition_bytes(d, r, layers, heads) / 2**20
        row = next((line for line in readme.splitlines() if line.startswith(f"| {label} ")), None)
        assert row, f"README sizing table has no {label} row"
        assert f"{mib:.1f} MiB" in row, (label, f"{mib:.1f} MiB", row)


def test_exec_probes_and_healthchecks_use_paths_the_images_have():
    """Exec probes (TLS component) and HEALTHCHECKs call the interpreter and script the images install."""
    for name in ("server.Dockerfile", "worker.Dockerfile"):
        text = (DEPLOY / name).read_text()
        assert "COPY deploy/healthcheck.py /usr/local/lib/sith/healthcheck.py" in text, name
        assert "-m venv /opt/sith" in text and "COPY --from=build /opt/sith /opt/sith" in text, name
    commands = re.findall(r"command: \[([^\]]+)\]", (K8S / "components/tls/kustomization.yaml").read_text())
    assert len(commands) == 3
    for cmd in commands:
        assert '"/opt/sith/bin/python", "/usr/local/lib/sith/healthcheck.py", "grpc"' in cmd
