"""The adapt_delta and universality job kinds through a real in-process worker and Redis."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from adaptation_fixtures import plant_rank_one
from edits_fixtures import CONCEPTS, TINY_CFG, tiny_clip
from test_workers_handlers import _run
from workers_fixtures import prefix, shared  # noqa: F401

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
        ("universality", {"model_a": base, "model_b": ft, "categories": {"water": ["water", "snow"]},
                          "permutations": 5, "image_mean": "none", **common}),
        ("adapt_delta", {"base": base, **common}),
        ("universality", {"model_a": base, "model_b": ft, "categories": "colours", **common}),
    ])
    assert delta.state == "succeeded", delta.error
    top = delta.result["top_heads"][0]
    assert (top["layer"], top["head"]) == (1, 2) and top["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert delta.result["top_heads"][1]["relative"] < 1e-5
    assert [row["layer"] for row in delta.result["layers"]] == [1, 2]
    assert match.state == "succeeded", match.error
    assert match.result["a"]["heads"] == match.result["b"]["heads"] == 3 * 4  # default "last four" = all 3 layers
    untouched = [m for m in match.result["matches"] if m["a"][0] != 1]
    assert all(m["a"] == m["b"] and m["score"] == pytest.approx(1.0) for m in untouched)
    assert missing.state == "failed" and missing.error["field"] == "finetuned"
    assert mismatch.state == "failed" and mismatch.error["field"] == "categories"
