"""The retention experiments' own measurements (experiments/retention_variants.py, the frontier's
embedding fidelity, experiments/regenerate.py) on the shipped testbed-small."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sith.engine.models import TESTBED_DIR

ROOT = Path(__file__).resolve().parents[1]
SMALL = TESTBED_DIR.parent / "testbed-small"
needs_small = pytest.mark.skipif(not (SMALL / "open_clip_model.safetensors").is_file(), reason="testbed-small not shipped")


def _module(name: str):
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small():
    from sith.engine.analysis import Analyzer
    from sith.engine.dictionary import build_dictionary
    from sith.engine.models import load_model
    from sith.testbed.vocabulary import testbed_vocabulary

    torch.manual_seed(0)
    loaded = load_model(config=str(SMALL))
    return loaded, Analyzer(loaded, build_dictionary(loaded, testbed_vocabulary()))


def _images(loaded, n: int = 6) -> torch.Tensor:
    from sith.engine.jointspace import _preprocess_stats, null_images

    mean, std, size = _preprocess_stats(loaded)
    return ((null_images(size) - mean[:, None, None]) / std[:, None, None])[:n]


@needs_small
def test_shift_direction_lowers_only_the_concept_and_is_written_into_the_readout_bias(small):
    rv = _module("retention_variants")
    loaded, analyzer = small
    d = analyzer.dictionary
    red = d.index("red")
    with pytest.raises(ValueError, match="span"):  # testbed-small's text embeddings are numerically rank-deficient
        rv.shift_direction(d, "red", None)
    few = copy.copy(d)
    few.embeddings = d.embeddings[:40]  # fewer concepts than dimensions: exact orthogonality exists
    w = rv.shift_direction(few, "red", None)
    scores = few.embeddings.double() @ w
    assert scores[red] == pytest.approx(1.0)
    assert scores[torch.arange(40) != red].abs().max() < 1e-9  # exactly orthogonal to every other concept
    ridge = rv.shift_direction(d, "red", 100.0)
    others = d.embeddings.double()[torch.arange(len(d)) != red] @ ridge
    assert float(d.embeddings.double()[red] @ ridge) == pytest.approx(1.0) and others.abs().max() < 0.5

    base = loaded.model.eval()
    moved = rv.shifted(base, ridge, 2.0)
    images = _images(loaded)
    with torch.no_grad():
        before = base.encode_image(images, normalize=False).double()
        after = moved.encode_image(images, normalize=False).double()
    assert torch.allclose(after - before, (-2.0 * ridge).expand_as(before), atol=1e-4)
    assert torch.equal(base.visual.ln_post.bias, loaded.model.visual.ln_post.bias)  # the base is untouched


@needs_small
def test_mean_preserving_correction_leaves_no_mean_change_on_its_reference(small):
    from sith.edits.apply import apply_multipliers
    from sith.edits.plan import plan_edit
    from sith.edits.spec import EditSpec

    rv = _module("retention_variants")
    loaded, analyzer = small
    base = loaded.model.eval()
    images = _images(loaded, 8)
    assert all(d.abs().max() == 0 for d in rv.mean_change(base, copy.deepcopy(base), images, False).values())
    plan = plan_edit(analyzer, EditSpec.from_dict({"model": loaded.name, "operations": [{"concepts": ["red"]}]}))
    edited = apply_multipliers(base, plan.multipliers, plan.decomposition).eval()
    before = rv.mean_change(base, edited, images, False)
    assert max(float(d.abs().max()) for d in before.values()) > 1e-3  # the edit does move the mean write
    corrected = rv.mean_preserving(base, edited, images, cls_only=False)
    after = rv.mean_change(base, corrected, images, False)
    assert max(float(d.abs().max()) for d in after.values()) < 1e-4


@needs_small
def test_fidelity_is_one_for_the_base_and_lower_for_an_edit(small):
    from sith.edits.apply import apply_multipliers
    from sith.edits.plan import plan_edit
    from sith.edits.spec import EditSpec

    sweep = _module("preserve_others_sweep")
    loaded, analyzer = small
    splits = sweep.ValidationSplits(loaded, 24, 8)
    base = loaded.model.eval()
    assert splits.fidelity(splits.embed(base, "val", 0), "val") == pytest.approx(1.0, abs=1e-5)
    plan = plan_edit(analyzer, EditSpec.from_dict({"model": loaded.name,
                                                   "operations": [{"concepts": ["blue"], "target": 0.0}]}))
    edited = apply_multipliers(base, plan.multipliers, plan.decomposition).eval()
    measured = splits.measure(edited, "val", {"kind": "remove", "concepts": ["blue"], "factor": "colour"})
    assert 0.0 < measured["fidelity"] < 1.0


def test_variant_summary_picks_the_best_feasible_point_per_family():
    rv = _module("retention_variants")
    rows = [{"family": "shift", "task": "red", "feasible": False, "key": -0.3, "recall": 0.3, "fidelity": 0.95},
            {"family": "shift", "task": "red", "feasible": True, "key": 0.9, "fidelity": 0.5},
            {"family": "mean-preserving", "task": "red", "feasible": True, "key": 0.99, "fidelity": 0.97,
             "reference": "validation images (data, upper bound)"}]
    assert rv.best(rows, "shift", "red")["key"] == 0.9  # feasible first
    assert rv.best(rows, "shift", "red", fidelity=0.9)["key"] == -0.3  # the fidelity floor excludes it
    assert rv.best(rows, "mean-preserving", "red") is None  # data-using references are not data-free
    table = rv.summary({"m": {"rows": rows}})
    assert "recall 30 % (0.95)" in table and "0.900 (0.50)" in table


def test_regenerate_runs_every_edit_experiment_per_model(monkeypatch):
    regen = _module("regenerate")
    calls: list[list[str]] = []
    monkeypatch.setattr(regen, "_run", lambda args: calls.append([Path(args[0]).name, *args[1:]]))
    regen.model_chain("testbed-small")
    scripts = [c[0] for c in calls]
    assert scripts[0] == "frontier.py" and scripts[-2:] == ["retention_diagnostics.py", "retention_variants.py"]
    sweeps = [c for c in calls if c[0] == "preserve_others_sweep.py"]
    assert len(sweeps) == len(regen.SWEEPS["common"]) + len(regen.SWEEPS["testbed-small"]) == 4
    parser = _module("preserve_others_sweep").build_parser()
    for call in sweeps:  # every stored configuration is one the sweep's own parser accepts
        args = parser.parse_args(call[1:])
        assert args.model == [str(regen.CHECKPOINTS / "testbed-small")] and args.grid
