"""experiments/ground_truth.py: η² against a hand-computed case, the truth rule, and the harness end to
end on the shipped testbed-small (few images, quick settings)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import ground_truth as harness  # noqa: E402
from ground_truth_data import eta_squared, ground_truth  # noqa: E402


def test_eta_squared_matches_a_hand_computed_anova() -> None:
    # Groups {0: [1, 2, 3], 1: [5, 7]}; grand mean 3.6.
    # SS_total = 6.76 + 2.56 + 0.36 + 1.96 + 11.56 = 23.2
    # SS_between = 3·(2 − 3.6)² + 2·(6 − 3.6)² = 7.68 + 11.52 = 19.2  ->  η² = 19.2 / 23.2
    acts = torch.tensor([[1.0], [2.0], [3.0], [5.0], [7.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert float(eta_squared(acts, labels, 2)[0]) == pytest.approx(19.2 / 23.2, rel=1e-6)


def test_eta_squared_skips_undefined_labels_and_constant_columns() -> None:
    acts = torch.tensor([[1.0, 4.0], [2.0, 4.0], [9.0, 4.0], [3.0, 4.0]])
    labels = torch.tensor([0, 1, -1, 1])  # the third row has no value (e.g. position on 3 objects)
    eta = eta_squared(acts, labels, 2)
    # Rows 0, 1, 3: groups {0: [1]}, {1: [2, 3]}; mean 2; SS_total 2; SS_between 1 + 2·0.25 = 1.5.
    assert float(eta[0]) == pytest.approx(0.75)
    assert float(eta[1]) == 0.0


def test_truth_is_the_argmax_factor_above_threshold_with_its_poles() -> None:
    from sith.testbed.factors import FACTORS

    n = 400
    gen = torch.Generator().manual_seed(0)
    labels = {f: torch.randint(len(v), (n,), generator=gen) for f, v in FACTORS.items()}
    colour = labels["colour"].float()
    acts = torch.stack([
        (colour == FACTORS["colour"].index("blue")).float() * 3 - (colour == FACTORS["colour"].index("red")).float() * 2
        + 0.1 * torch.randn(n, generator=gen),
        torch.randn(n, generator=gen),  # carries nothing
    ], dim=1)
    truth = ground_truth(acts, labels)
    assert truth.factor == ["colour", None]
    assert (truth.positive[0], truth.negative[0]) == ("blue", "red")
    assert truth.carrying == [0]


def test_agreement_scores_top1_against_truth() -> None:
    truth = harness.Truth(eta={}, factor=["colour", "background", None], positive=["red", "water", None],
                          negative=["blue", "land", None])
    scores = harness.agreement(["red", "sky", "photo"], ["blue", "circle", None], [["red"], ["sky", "water"], ["photo"]],
                               truth, truth.carrying)
    assert scores == {"n": 2, "factor": 1.0, "value": 0.5, "neg_value": 0.5, "in_k": 1.0, "distractor": 0.0}
    precision = harness.precision(["red", "sky", "photo"], truth, truth.carrying)
    assert precision["background"]["factor_right"] == 1.0 and precision["background"]["value_right"] == 0.0


def test_confidence_fit_is_monotone_and_bounded() -> None:
    from sith.engine.analysis import explanation_confidence

    gen = torch.Generator().manual_seed(1)
    feats = torch.rand(300, 4, generator=gen)
    right = (feats[:, 1] + 0.2 * torch.randn(300, generator=gen) > 0.5).float()
    weights, bias = harness.fit_confidence(feats, right, steps=500)
    assert all(w >= 0 for w in weights) and weights[1] > 0
    conf = explanation_confidence(feats, weights, bias)
    assert bool(((conf >= 0) & (conf <= 1)).all())
    table = harness.reliability(conf, right)
    assert sum(b["n"] for b in table) == 300


@pytest.mark.slow
def test_harness_end_to_end_on_testbed_small(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "out"
    result = harness.main(["--model", "testbed-small", "--n", "120", "--per-head", "2", "--quick", "--out", str(out)])
    assert {p.name for p in out.iterdir()} >= {"results.json", "tables.md", "agreement.png"}
    r = result["results"]["testbed-small"]
    assert r["vectors"] == 5 * 4 * 2  # 5 layers, 4 heads, 2 vectors each
    before = harness._find(r, harness.BEFORE)["test"]["all"]
    after = harness._find(r, harness.DEFAULT)["test"]["all"]
    for scores in (before, after):
        assert 0.0 <= scores["value"] <= scores["factor"] <= 1.0
    assert after["distractor"] <= 0.2  # no unlearnt words in the default vocabulary
    text = (out / "tables.md").read_text()
    assert "Before / after" in text and "testbed-small" in text
    # The default explains the mapped vectors without the tower's shared directions; the levers are measured.
    assert harness.DEFAULT[1] == "poles-shared" and harness.PREVIOUS[1] == "poles"
    assert "Levers beyond the grid" in text and "previous default" in text
    levers = {(row["lever"], row["setting"]): row for row in r["levers"]}
    assert {lever for lever, _ in levers} == {"reference", "(f) prompt ensembles", "(g) per-factor calibration",
                                              "(h) shared directions", "(i) read side"}
    default_row = levers[("reference", "default (poles, shared directions removed, specific)")]
    assert default_row["test"]["all"] == after  # the lever reference is the harness default
    assert levers[("(h) shared directions", "remove top 2 (whole tower)")]["test"]["all"] == after
    conf = result["confidence"]["models"]["testbed-small"]["test"]
    assert 0.0 <= conf["mean_confidence"] <= 1.0
