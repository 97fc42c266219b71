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


def _frontier():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "experiments" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frontier_targets_and_choice_rule_follow_the_issue():
    fr = _frontier()
    task = fr.TASKS["red"]
    base = {"factors": {f: 0.8 for f in fr.FACTOR_NAMES}, "recall": 0.98, "rest": 0.9}
    good = {"factors": {**base["factors"], "colour": 0.5}, "recall": 0.1, "rest": 0.9 * 0.96}
    s = fr.summarise(good, base, task)
    assert s["met"] and s["rest_keep"] == pytest.approx(0.96) and s["other_min"] == pytest.approx(1.0)
    weak = fr.summarise({**good, "recall": 0.3}, base, task)
    costly = fr.summarise({**good, "rest": 0.5}, base, task)
    assert not weak["met"] and not costly["met"]
    # validation rule: reaching the removal target beats anything that does not; then retention
    assert fr.choice_key(s, task) > fr.choice_key(costly, task) > fr.choice_key(weak, task)
    debias = fr.TASKS["water/land"]
    base = {"factors": {f: 0.8 for f in fr.FACTOR_NAMES}, "worst": 0.6, "mean": 0.8}
    lifted = fr.summarise({**base, "worst": 0.85, "mean": 0.85}, base, debias)
    assert lifted["met"] and lifted["worst_gain"] == pytest.approx(0.25)
    assert not fr.summarise({**base, "worst": 0.85, "mean": 0.7}, base, debias)["met"]


def test_removal_counts_on_validation_only_with_confidence():
    fr = _frontier()
    # the Wilson bound: 6 of 45 recognised (13.3 %) is not confidently under 15 %; 18 of 180 (10 %) is
    assert fr.recall_upper(6 / 45, 45) > fr.RECALL_TARGET > fr.recall_upper(18 / 180, 180)
    assert fr.recall_upper(0.0, 180) < 0.02 and fr.recall_upper(0.5, 0) == 1.0
    task = fr.TASKS["red"]
    base = {"factors": {f: 0.8 for f in fr.FACTOR_NAMES}, "recall": 0.98, "rest": 0.9, "n": 45}
    lucky = fr.summarise({**base, "recall": 6 / 45}, base, task)
    assert lucky["recall"] == pytest.approx(6 / 45) and lucky["recall_upper"] > fr.RECALL_TARGET
    assert not fr.effect_met(lucky, task) and fr.effect_met({**lucky, "recall_upper": 0.12}, task)


def test_paired_interval_brackets_the_kept_share():
    import torch

    fr = _frontier()
    base = torch.rand(2000, generator=torch.Generator().manual_seed(1)) < 0.3
    assert fr.paired_interval(base, base) == pytest.approx([1.0, 1.0])  # same images, same answers
    lost = base.clone()
    lost[torch.nonzero(base)[:60, 0]] = False  # 60 of ~600 right answers lost: kept share ~0.9
    lo, hi = fr.paired_interval(base, lost)
    assert lo < float(lost.float().mean() / base.float().mean()) < hi < 1.0


def test_default_target_choice_meets_most_effects_then_keeps_most():
    fr = _frontier()
    remove, debias = fr.TASKS["red"], fr.TASKS["water/land"]

    def point(target, val):
        return {"operator": fr.DEFAULT_OPERATOR, "target": target, "val": val}

    def removal(upper, rest):
        return {"recall": upper, "recall_upper": upper, "rest_keep": rest, "other_min": 0.97}

    raw = {"m": {"model": "m", "tasks": {
        "red": {"task": remove, "points": [point(0.2, removal(0.18, 0.97)), point(0.15, removal(0.1, 0.93)),
                                           point(0.1, removal(0.0, 0.9))]},
        "water/land": {"task": debias, "points": [
            point(t, {"worst_gain": 0.25, "mean_gain": 0.01, "other_min": keep})
            for t, keep in ((0.2, 0.96), (0.15, 0.95), (0.1, 0.94))]}}}}
    choice = fr.default_target_choice(raw)  # the suppress default: the removals alone
    # 0.2 keeps the most but leaves red recognised; of the two that remove it, 0.15 keeps more
    assert choice["chosen"] == 0.15
    assert [r["met"] for r in choice["rows"] if r["target"] in (0.2, 0.15, 0.1)] == [0, 1, 1]
    assert all(set(r["cells"]) == {"m red"} for r in choice["rows"])
    # the debias default: every target meets the gain, 0.2 keeps the most
    assert fr.default_target_choice(raw, "debias")["chosen"] == 0.2
    rendered = fr.render_target_choice(raw)
    assert rendered.count("(chosen)") == 2 and "`DEFAULT_DEBIAS_TARGET`" in rendered


def test_rank_correlation_and_probe_are_real_measurements():
    import torch

    fr = _frontier()
    assert fr.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert fr.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = x[:, 0] > 0.3
    assert fr.probe_accuracy(x[:200], y[:200], x[200:], y[200:]) > 0.95  # a linearly present concept is found
    noise = torch.randn(400, 8, generator=g)
    assert fr.probe_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.65  # a removed one is not


@pytest.mark.slow
@pytest.mark.skipif(not (SMALL / "open_clip_model.safetensors").is_file(), reason="testbed-small not shipped")
def test_frontier_quick_run_writes_tables_plot_and_the_default_point(tmp_path):
    fr = _frontier()
    out = tmp_path / "frontier.md"
    assert fr.main(["--model", str(SMALL), "--quick", "--task", "red", "--out", str(out),
                    "--figures", str(tmp_path)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "Remove \"red\"" in text and "default command" in text and "Spearman" in text
    result = json.loads((tmp_path / "frontier.json").read_text())["testbed-small"]
    entry = result["tasks"]["red"]
    assert {p["operator"] for p in entry["points"]} == set(fr.OPERATORS)
    assert entry["default"]["operator"] == "head_mlp_orthogonal" and 0 <= entry["default"]["test"]["recall"] <= 1
    # the strongest default-operator edit removes more than the weakest one (a real, monotone effect)
    hp = {p["target"]: p["test"]["recall"] for p in entry["points"] if p["operator"] == "head_mlp_project"}
    assert hp[min(hp)] <= hp[max(hp)]
    assert (tmp_path / "frontier-testbed-small.png").stat().st_size > 1000
