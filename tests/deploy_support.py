"""Shared helpers for tests/test_deploy_*.py: paths and loaders for the files under deploy/."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DATA = Path(__file__).resolve().parent / "data"


def tool(name: str) -> str | None:
    """A console script installed next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s_resource_files() -> list[Path]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / name for name in kust["resources"]]


def k8s_docs() -> list[dict]:
    return [d for p in k8s_resource_files() for d in load_all(p)]


def k8s_find(kind: str, name: str) -> dict:
    for doc in k8s_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KeyError(f"{kind}/{name}")


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV key=value pairs of a Dockerfile's final stage (continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    final = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S*)", line[4:]):
                env[key] = value
    return env
