"""Every command on every tower family, as a user types it (issue 13's "done means").

Each family's tiny random-init model (tests/test_engine_towers.py's configs, with the text vocabulary
widened to the tokenizer's so that words encode) is saved in its own stock format — an open_clip
folder, or a transformers folder — and driven through the CLI: decompose, explain, find, edit apply
(the default operator and the paper's sith_scale), the edited file reopened, `adapt delta` between
base and edit, and `adapt match` of the model with itself.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
from click.testing import CliRunner

import test_engine_towers as towers
from sith.cli import main
from sith.edits.export import export_model

WORDS = ["red", "blue", "green", "dog", "car", "tree", "water", "circle", "square", "house"]
# transformers SigLIP folders need their own sentencepiece tokenizer files to encode words; the tiny
# ones here have none, so text commands must fail with a clear error naming them (docs/towers.md).
NO_TOKENIZER = {"hf-siglip", "hf-siglip2"}


def _with_tokenizer_vocabulary(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for key in ("text_cfg", "multimodal_cfg"):
        if isinstance(cfg.get(key), dict) and "vocab_size" in cfg[key]:
            cfg[key]["vocab_size"] = 49408  # open_clip's BPE
    return cfg


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("\n".join(WORDS), encoding="utf-8")
    return str(path)


def _saved(family: str, folder) -> str:
    if family in towers.HF:
        return str(towers.build(family).sith_export(folder, {}))
    cfg = _with_tokenizer_vocabulary(towers.OPEN_CLIP[family])
    with mock.patch.dict(towers.OPEN_CLIP, {family: cfg}):
        model = towers.build(family)
    return str(export_model(model, folder, {}, model_cfg=cfg))


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"sith {' '.join(args)}\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.mark.slow
@pytest.mark.parametrize("family", towers.FAMILIES)
def test_every_command_on_every_family(family, vocabulary, tmp_path):
    model = _saved(family, tmp_path / "model")
    _ok(["decompose", "--model", model, "--layer", "-1"])
    if family in NO_TOKENIZER:
        result = CliRunner().invoke(main, ["explain", "--model", model, "--dictionary", vocabulary])
        assert result.exit_code != 0 and "no tokenizer files" in result.output, result.output
        assert isinstance(result.exception, SystemExit), result.exception  # an error message, not a traceback
        return
    _ok(["explain", "--model", model, "--layer", "-1", "--dictionary", vocabulary])
    _ok(["find", "red", "--model", model, "--dictionary", vocabulary])
    edited = tmp_path / "edited"
    out = _ok(["edit", "apply", "--concept", "red", "--model", model, "--dictionary", vocabulary, "--out", str(edited)])
    assert "[no-mlp]" not in out, out  # the default operator edits every family's MLP outputs too
    _ok(["edit", "apply", "--concept", "red", "--operator", "sith_scale", "--model", model,
         "--dictionary", vocabulary, "--out", str(tmp_path / "scaled.safetensors")])
    _ok(["edit", "show", str(tmp_path / "scaled.safetensors")])
    _ok(["decompose", "--model", str(tmp_path / "scaled.safetensors"), "--layer", "-1"])
    _ok(["adapt", "delta", model, str(edited), "--vocabulary", vocabulary])
    _ok(["adapt", "match", model, model, "--vocabulary", vocabulary, "--permutations", "5"])


def test_default_edit_on_a_tower_without_foldable_mlps_edits_the_heads_and_says_so(vocabulary, tmp_path, monkeypatch):
    """A tower whose blocks expose no MLP output the adapter can fold: the default operator still
    works (heads only) and the preview carries a [no-mlp] warning, never a refusal or a silent change."""
    from sith.engine.towers.blocks import FastViTBlock

    model = _saved("fastvit", tmp_path / "model")
    monkeypatch.setattr(FastViTBlock, "mlp_out", lambda self: None)
    out = _ok(["edit", "apply", "--concept", "red", "--model", model, "--dictionary", vocabulary,
               "--out", str(tmp_path / "edited.safetensors")])
    assert "[no-mlp]" in out and "wrote" in out
    shown = _ok(["edit", "show", str(tmp_path / "edited.safetensors")])
    changed = next(line for line in shown.splitlines() if line.strip().startswith("changed:"))
    assert "head(s)" in changed and "MLP" not in changed, shown


def test_a_tokenizer_that_overflows_the_text_tower_is_a_clear_error(vocabulary, tmp_path):
    """The tiny configs' text towers have 1,000 token rows, open_clip's BPE gives ids up to 49,407:
    a clear 'model' error naming both sizes, not an IndexError traceback from the embedding."""
    model = str(export_model(towers.build("openclip-ls"), tmp_path / "m", {}, model_cfg=towers.OPEN_CLIP["openclip-ls"]))
    result = CliRunner().invoke(main, ["explain", "--model", model, "--dictionary", vocabulary])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    assert "token embedding has only 1000 rows" in result.output and "model" in result.output, result.output
