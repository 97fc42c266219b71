"""Evaluation harness: prompts, group metrics, and a full run on an untrained model."""

from __future__ import annotations

import open_clip
import pytest
import torch

from sith.engine.errors import InvalidInput
from sith.testbed.evaluate import (
    CLASS_PHRASES,
    _group_report,
    evaluate,
    prompts,
    retrieval_set,
    spurious_set,
    summary_rows,
)
from sith.testbed.factors import FACTORS
from sith.testbed.spurious import GROUP_CELLS

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "head_width": 16, "layers": 2},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return open_clip.model.CLIP(**TINY_CFG).eval(), open_clip.SimpleTokenizer(context_length=32)


def test_prompts_follow_label_order():
    assert set(CLASS_PHRASES) == set(FACTORS)
    for factor, values in FACTORS.items():
        phrases = prompts(factor)
        assert len(phrases) == len(values) == len(set(phrases))
        if factor != "count":
            assert all(v in p for v, p in zip(values, phrases))
    assert prompts("colour")[0] == "a red object" and prompts("background")[0] == "something on water"


def test_group_report_takes_the_minimum_cell():
    cells = [GROUP_CELLS[i % 4] for i in range(8)]
    correct = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)  # cell 2 wrong twice, cell 1 once
    report = _group_report(correct, cells)
    assert report["groups"]["angular/water"] == 0.0 and report["groups"]["round/land"] == 0.5
    assert report["worst_group"] == "angular/water" and report["worst_group_accuracy"] == 0.0
    assert report["mean_accuracy"] == pytest.approx(5 / 8)


def test_heldout_sets_are_deterministic_and_balanced():
    batch, cells = spurious_set(8)
    assert sorted(cells) == sorted(GROUP_CELLS * 2)
    again, _ = spurious_set.__wrapped__(8)
    assert torch.equal(batch.images, again.images)
    _, captions = retrieval_set(4)
    assert all(c.startswith("a photo of ") for c in captions)


@pytest.mark.slow
def test_untrained_model_scores_near_chance_and_reproducibly(tiny):
    model, tokenizer = tiny
    first = evaluate(model, tokenizer, n_factor=160, n_spurious=40, n_retrieval=60)
    second = evaluate(model, tokenizer, n_factor=160, n_spurious=40, n_retrieval=60)
    assert first == second
    for factor, result in first["zero_shot"].items():
        assert result["accuracy"] <= max(0.45, 3 * result["chance"]), factor
    assert first["zero_shot"]["position"]["n"] < 160  # only single-object images have a position
    assert set(first["spurious"]["prompt"]["groups"]) == {f"{g}/{b}" for g, b in GROUP_CELLS}
    assert first["retrieval"]["image_to_text_r1"] <= first["retrieval"]["image_to_text_r5"] < 0.5
    assert len(summary_rows(first)) == len(FACTORS) + 4 + 4


def test_bad_sizes_are_rejected(tiny):
    model, tokenizer = tiny
    with pytest.raises(InvalidInput):
        evaluate(model, tokenizer, n_factor=0)
    with pytest.raises(InvalidInput):
        evaluate(model, tokenizer, n_factor=10, n_spurious=2)


@pytest.mark.slow
def test_cli_evaluate_writes_where_asked_never_into_the_package(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from sith.cli import main
    from sith.testbed.checkpoint import CHECKPOINT_DIR

    shipped = CHECKPOINT_DIR / "testbed-small" / "eval.json"
    before = shipped.read_bytes()
    monkeypatch.chdir(tmp_path)
    sizes = ["--n-factor", "40", "--n-spurious", "8", "--n-retrieval", "10"]
    result = CliRunner().invoke(main, ["testbed", "evaluate", "small", *sizes], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "zero-shot colour" in result.output
    written = json.loads((tmp_path / "testbed-small.eval.json").read_text())
    assert written["model"] == "testbed-small" and written["zero_shot"]["colour"]["n"] == 40
    assert shipped.read_bytes() == before
    out = tmp_path / "results" / "small.json"
    result = CliRunner().invoke(main, ["testbed", "evaluate", "testbed-small", *sizes, "--out", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(out.read_text())["hash"] == json.loads(result.stdout)["hash"]
    clash = CliRunner().invoke(main, ["testbed", "evaluate", "small", "--out", str(out), "--no-write"])
    assert clash.exit_code == 2 and "--out" in clash.output


def test_train_defaults_to_the_users_data_folder(tmp_path, monkeypatch):
    from sith.cli.testbed import default_train_dir
    from sith.testbed.checkpoint import CHECKPOINT_DIR

    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path))
    assert default_train_dir("testbed-main") == tmp_path / "testbed" / "testbed-main"
    assert CHECKPOINT_DIR not in default_train_dir("testbed-main").parents


def test_evaluate_folder_writes_only_when_given_a_path(tmp_path, tiny):
    from safetensors.torch import save_file

    from sith.testbed.evaluate import evaluate_folder

    model, _ = tiny
    (tmp_path / "open_clip_config.json").write_text(__import__("json").dumps({"model_cfg": TINY_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    result = evaluate_folder(tmp_path, n_factor=8, n_spurious=4, n_retrieval=4)
    assert result["model"] == tmp_path.name and not (tmp_path / "eval.json").exists()
    evaluate_folder(tmp_path, tmp_path / "out.json", n_factor=8, n_spurious=4, n_retrieval=4)
    assert (tmp_path / "out.json").is_file()
    with pytest.raises(InvalidInput):
        evaluate_folder(tmp_path, tmp_path, n_factor=8, n_spurious=4, n_retrieval=4)
