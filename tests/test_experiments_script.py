"""experiments/run_experiments.py end to end on the shipped testbed-small (quick splits)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sith.engine.models import TESTBED_DIR

ROOT = Path(__file__).resolve().parents[1]
SMALL = TESTBED_DIR.parent / "testbed-small"


def _script():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("run_experiments", ROOT / "experiments" / "run_experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retention_is_the_ratio_to_the_base_over_other_factors():
    script = _script()
    before = {f: 0.8 for f in script.FACTOR_NAMES}
    after = {**before, "colour": 0.0, "shape": 0.4}
    lo, mean = script.retention(after, before, skip="colour")
    assert lo == pytest.approx(0.5)
    assert mean == pytest.approx((len(before) - 2 + 0.5) / (len(before) - 1))


@pytest.mark.slow
@pytest.mark.skipif(not (SMALL / "open_clip_model.safetensors").is_file(), reason="testbed-small not shipped")
def test_quick_run_writes_every_table_and_removal_lowers_the_concept(tmp_path):
    out = tmp_path / "tables.md"
    assert _script().main(["--model", str(SMALL), "--quick", "--layers", "all", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    for heading in ("(a) Spurious", "(b)", "(c)", "(d) Explanation quality"):
        assert heading in text
    results = json.loads((tmp_path / "results.json").read_text())["testbed-small"]
    removal = results["removal"]
    assert removal["sith"]["recall"] < removal["base"]["recall"]  # the chosen edit really removes red
    assert removal["sith"]["vectors"] >= 1 and removal["heads"]["vectors"] % 24 == 0  # heads: whole heads only
    for method in ("comp", "nnomp", "topk"):
        quality = results["explanations"][method]
        assert 0 <= quality["theme_one_factor"] <= 1 and 0 < quality["purity"] <= 1
        assert -1 <= quality["fidelity"] <= 1 and 0 < quality["joint_fidelity"] <= 1
    assert results["explanations"]["proj_condition"] >= 1
