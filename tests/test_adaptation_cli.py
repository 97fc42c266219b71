"""`sith adapt ...` on tiny models: JSON output and the figures (PNG + SVG)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adaptation_fixtures import TINY_CFG, plant_rank_one, tiny_clip
from edits_fixtures import CONCEPTS
from sith.adaptation import plots
from sith.cli import main
from sith.edits.multipliers import Multipliers
from sith.engine.errors import InvalidInput
from test_adaptation_jobs import _folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_clip(0)
    write = torch.randn(TINY_CFG["vision_cfg"]["width"], generator=torch.Generator().manual_seed(4))
    vocab = root / "concepts.txt"
    vocab.write_text("\n".join(CONCEPTS))
    cats = root / "categories.json"
    cats.write_text(json.dumps({"colour": ["red", "blue", "green", "yellow"], "background": ["water", "land", "snow"]}))
    return {"base": _folder(root / "base", base), "ft": _folder(root / "ft", plant_rank_one(base, 2, 0, write)),
            "vocab": str(vocab), "cats": str(cats), "root": root}


def _invoke(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_delta_json_and_plots(files, monkeypatch):
    monkeypatch.setenv("SITH_DATA_DIR", str(files["root"] / "data"))
    plot_dir = files["root"] / "delta-plots"
    result = _invoke(["adapt", "delta", files["base"], files["ft"], "--vocabulary", files["vocab"], "--json",
                      "--top", "3", "--plot-dir", str(plot_dir)])
    data = json.loads(result.stdout)
    assert (data["top_heads"][0]["layer"], data["top_heads"][0]["head"]) == (2, 0)
    assert {row["layer"] for row in data["layers"]} == {0, 1, 2}
    for stem in ("stability", "delta_norms", "spectra_L2"):
        for fmt in ("png", "svg"):
            assert (plot_dir / f"{stem}.{fmt}").stat().st_size > 1000


def test_match_json_themes_and_spectra(files, monkeypatch):
    monkeypatch.setenv("SITH_DATA_DIR", str(files["root"] / "data"))
    plot_dir = files["root"] / "match-plots"
    result = _invoke(["adapt", "match", files["base"], files["base"], "--vocabulary", files["vocab"],
                      "--categories", files["cats"], "--json", "--plot-dir", str(plot_dir)])
    data = json.loads(result.stdout)
    assert data["mean_score"] == pytest.approx(1.0) and data["mutual"] == len(data["matches"])
    assert (plot_dir / "matches.svg").is_file() and (plot_dir / "themes_base.png").is_file()
    alpha = torch.ones(4, 16)
    alpha[1, :3] = 0.0
    edit = files["root"] / "edit.safetensors"
    Multipliers({2: alpha}).save(edit)
    _invoke(["adapt", "plot", "spectra", files["base"], "--edit", str(edit), "--layer", "2",
             "--out", str(files["root"] / "spectra")])
    _invoke(["adapt", "plot", "stability", files["base"], files["ft"], "--out", str(files["root"] / "stab")])
    assert (files["root"] / "spectra.svg").is_file() and (files["root"] / "stab.png").is_file()


def test_cli_rejects_bad_input(files):
    result = CliRunner().invoke(main, ["adapt", "plot", "spectra", files["base"], "--out", "/tmp/x"])
    assert result.exit_code == 2 and "--edit" in result.output


def test_theme_plot_checks_shapes():
    with pytest.raises(InvalidInput) as info:
        plots.plot_themes([(0, 0)], np.zeros((2, 3)), ["a", "b", "c"], ["x"])
    assert info.value.field == "shares"
