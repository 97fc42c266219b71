"""The adapt_delta and universality job kinds through a real in-process worker and Redis."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from adaptation_fixtures import plant_rank_one
from edits_fixtures import CONCEPTS, TINY_CFG, tiny_clip
from test_workers_handlers import _run, typed

from sith_api.v1 import adaptation_pb2 as apb

pytestmark = pytest.mark.slow


def _folder(path, model) -> str:
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    base = tiny_clip(0)
    write = torch.randn(TINY_CFG["vision_cfg"]["width"], generator=torch.Generator().manual_seed(1))
    return _folder(tmp_path / "base", base), _folder(tmp_path / "ft", plant_rank_one(base, 1, 2, write))


def test_delta_and_universality_jobs(shared, prefix, pair):
    base, ft = pair
    common = {"dictionary": CONCEPTS, "k": 3}
    (delta, match, missing, mismatch), _ = _run(shared, prefix, [
        ("adapt_delta", {"base": base, "finetuned": ft, "layers": [1, 2], "top": 2, **common}),
        # a model against its own fine-tune: the per-head profile, so untouched heads pair with themselves
        ("universality", {"model_a": base, "model_b": ft, "categories": {"water": ["water", "snow"]},
                          "permutations": 5, "image_mean": "none", "profile": "capacity", **common}),
        ("adapt_delta", {"base": base, **common}),
        ("universality", {"model_a": base, "model_b": ft, "categories": "colours", **common}),
    ])
    assert delta.state == "succeeded", delta.error
    report = typed(delta, apb.DeltaReport)
    top = report.top_heads[0]
    assert (top.layer, top.head) == (1, 2) and top.effective_rank == pytest.approx(1.0, abs=1e-3)
    assert report.top_heads[1].relative < 1e-5
    assert [row.layer for row in report.layers] == [1, 2]
    assert match.state == "succeeded", match.error
    matched = typed(match, apb.MatchReport)
    assert matched.a.heads == matched.b.heads == 3 * 4  # default "last four" = all 3 layers
    untouched = [m for m in matched.matches if m.a.layer != 1]
    assert all(m.a == m.b and m.score == pytest.approx(1.0) for m in untouched)
    assert set(matched.specialised.a) <= {"water"}
    assert matched.profile == "capacity" and matched.category_null.permutations == 5
    assert missing.state == "failed" and missing.error["field"] == "finetuned"
    assert mismatch.state == "failed" and mismatch.error["field"] == "categories"


def test_match_report_carries_ground_truth_agreement(tmp_path):
    """Ground-truth labels (as ``sith adapt match --ground-truth`` measures them) reach the typed report."""
    from adaptation_fixtures import save_and_load
    from sith.adaptation.reports import match_report
    from sith.adaptation.universality import GroundTruth
    from sith.engine.analysis import Analyzer
    from sith.engine.dictionary import build_dictionary
    from sith_workers.results import match_report as typed

    loaded = save_and_load(tiny_clip(0), TINY_CFG, tmp_path, "a")
    analyzer = Analyzer(loaded, build_dictionary(loaded, CONCEPTS, cache_dir=tmp_path))
    layer, heads = loaded.info.layers - 1, loaded.info.heads
    factors = ["shape", "colour"]
    # head h is labelled factors[h % 2]: the self-match pairs every head with itself, so all pairs agree
    eta2 = torch.tensor([[0.9, 0.1] if h % 2 == 0 else [0.1, 0.9] for h in range(heads)])
    truth = GroundTruth(heads=[(layer, h) for h in range(heads)], factors=factors, eta2=eta2, images=12)
    result, _ = match_report(analyzer, analyzer, [layer], [layer], k=3, permutations=5, ground_truth=(truth, truth))
    report = typed(result)
    for field in ("ground_truth", "ground_truth_relative", "same_layer"):
        assert report.agreement.HasField(field)
        agreement = getattr(report.agreement, field)
        assert (agreement.observed, agreement.pairs, agreement.agreeing) == (1.0, heads, heads)
        assert agreement.p_value == pytest.approx(result["agreement"][field]["p_value"])
    assert report.agreement.ground_truth.chance_mean < 1.0
    assert not report.agreement.HasField("dominant_category")
    assert {(m.a.head, m.truth_a, m.truth_b) for m in report.matches} == {
        (h, factors[h % 2], factors[h % 2]) for h in range(heads)}
    assert report.usage_null.permutations == 5 and report.similarity.heads_a[0].layer == layer
