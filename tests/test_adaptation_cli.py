"""`sith adapt ...` on tiny models: JSON output and the figures (PNG + SVG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adaptation_fixtures import TINY_CFG, plant_rank_one, tiny_clip
from adaptation_fixtures import checkpoint_folder as _folder
from edits_fixtures import CONCEPTS
from sith.adaptation import plots
from sith.cli import main
from sith.edits.multipliers import Multipliers
from sith.engine.errors import InvalidInput


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
    # the chance level keeps concept usage and comes with its p-value; every head pair is reported
    n = len(data["matches"])
    assert data["null"]["kind"] == "usage" and data["null"]["p_value"] == pytest.approx(1 / 201)
    assert data["null"]["mean"] < 1.0 and data["label_shuffle_null"]["mean"] < 1.0
    matrix = np.asarray(data["similarity"]["matrix"])
    assert matrix.shape == (n, n) and np.allclose(np.diag(matrix), 1.0, atol=1e-3)
    assert data["all_pairs_mean"] == pytest.approx(matrix.mean(), abs=1e-3)
    assert data["agreement"]["same_layer"]["observed"] == 1.0
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


def test_match_with_untrained_control_and_readable_table(files, monkeypatch):
    monkeypatch.setenv("SITH_DATA_DIR", str(files["root"] / "data"))
    result = _invoke(["adapt", "match", files["base"], files["ft"], "--vocabulary", files["vocab"], "--json",
                      "--control", "untrained", "--permutations", "50"])
    data = json.loads(result.stdout)
    assert data["control"]["b"]["name"].endswith("-untrained-vision")
    assert data["control"]["b"]["hash"] != data["b"]["hash"]
    assert 0 < data["control"]["null"]["p_value"] <= 1 and data["null"]["permutations"] == 50
    table = _invoke(["adapt", "match", files["base"], files["ft"], "--vocabulary", files["vocab"],
                     "--permutations", "20"]).output
    assert "chance (concept usage kept)" in table and "p = " in table and "all" in table
    bad = CliRunner().invoke(main, ["adapt", "match", files["base"], files["ft"], "--permutations", "0"])
    assert bad.exit_code != 0 and "permutations" in bad.output


def test_finetune_default_is_the_documented_recipe():
    from sith.adaptation.experiment import STEPS
    from sith.adaptation.finetune import DEFAULT_STEPS, FinetuneConfig
    from sith.cli.adapt import finetune

    steps = next(p for p in finetune.params if p.name == "steps")
    assert steps.default == DEFAULT_STEPS == FinetuneConfig().steps == STEPS


def test_delta_names_world_words_for_a_testbed_model_without_a_flag(tmp_path, monkeypatch):
    """The model-aware vocabulary: a fine-tune of testbed-main is explained with the world's words."""
    from sith.engine.models import load_reference
    from sith.testbed.vocabulary import vocabulary_for

    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path / "data"))
    base = load_reference("testbed-main")
    width = base.info.width
    write = torch.randn(width, generator=torch.Generator().manual_seed(2))
    cfg = json.loads((Path(base_folder()) / "open_clip_config.json").read_text())["model_cfg"]
    ft = _folder(tmp_path / "ft", plant_rank_one(base.model, 5, 1, write, scale=0.5), cfg)
    data = json.loads(_invoke(["adapt", "delta", "testbed-main", ft, "--json", "--top", "2", "-l", "5"]).stdout)
    words = set(vocabulary_for("testbed-main"))
    named = {c for h in data["top_heads"] for d in h["directions"] for c, _ in d["positive"] + d["negative"]}
    assert named and named <= words
    assert (data["top_heads"][0]["layer"], data["top_heads"][0]["head"]) == (5, 1)


def base_folder() -> str:
    from sith.engine.models import TESTBED_DIR

    return str(TESTBED_DIR)


def test_study_rewrites_only_the_generated_blocks(tmp_path):
    from sith.adaptation.experiment import write_docs

    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- BEGIN GENERATED: a -->\n<!-- END GENERATED: a -->\nmiddle\n"
                   "<!-- BEGIN GENERATED: b -->\nold | table\n<!-- END GENERATED: b -->\nend\n")
    assert write_docs(doc, {"a": "| x |", "b": "| y |", "missing": "| z |"}) == ["a", "b"]
    text = doc.read_text()
    assert "| x |" in text and "| y |" in text and "old" not in text and "| z |" not in text
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    assert write_docs(doc, {"a": "| x2 |"}) == ["a"] and "| x2 |" in doc.read_text() and "| x |" not in doc.read_text()
