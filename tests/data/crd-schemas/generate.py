"""Regenerate the vendored CRD schemas used by tests/test_deploy_lint.py (not run by the tests).

    python3 -m venv /tmp/crd && /tmp/crd/bin/pip install cloudcoil-models-keda==2.16.1.0 \
        cloudcoil-models-prometheus-operator==0.80.1.0
    /tmp/crd/bin/python tests/data/crd-schemas/generate.py

The cloudcoil packages are pydantic models generated from the upstream CRDs (KEDA 2.16.1,
prometheus-operator 0.80.1). Their JSON schemas are written here with `additionalProperties:
false` added to every object that lists properties, so a misspelt field fails validation (the
same "strict" idea as kubernetes-validate --strict). Python >= 3.14 is needed for newer releases.
"""

import json
from pathlib import Path

from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as mon

OUT = Path(__file__).resolve().parent
KEDA = "KEDA 2.16.1 CRDs via cloudcoil-models-keda==2.16.1.0"
PROM = "prometheus-operator 0.80.1 CRDs via cloudcoil-models-prometheus-operator==0.80.1.0"


def strict(node):
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)


for name, model, source in [
    ("scaledobject-keda-v1alpha1", keda.ScaledObject, KEDA),
    ("triggerauthentication-keda-v1alpha1", keda.TriggerAuthentication, KEDA),
    ("servicemonitor-monitoring-v1", mon.ServiceMonitor, PROM),
    ("podmonitor-monitoring-v1", mon.PodMonitor, PROM),
]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    strict(schema)
    schema["$comment"] = (f"Generated from {source} (model_json_schema, additionalProperties=false added "
                          "to objects with properties). Regenerate with tests/data/crd-schemas/generate.py.")
    (OUT / f"{name}.json").write_text(json.dumps(schema, indent=1, sort_keys=True))
