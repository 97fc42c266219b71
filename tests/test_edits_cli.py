"""`sith edit preview|apply|show|revert` end to end on a tiny model (real loader, analyzer, export)."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edits_fixtures import CONCEPTS, TINY_CFG, images, tiny_clip
from sith.cli import main
from sith.edits.spec import DEFAULT_DEBIAS_TARGET, DEFAULT_SUPPRESS_TARGET


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path / "data"))
    model = tiny_clip()
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CFG))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    (tmp_path / "concepts.txt").write_text("\n".join(CONCEPTS))
    model_args = ["--config", str(tmp_path / "tiny.json"), "--checkpoint", str(tmp_path / "tiny.safetensors")]
    return tmp_path, model, model_args, ["--dictionary", str(tmp_path / "concepts.txt")]


def _embed(state_path, x):
    plain = open_clip.model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    plain.load_state_dict(load_file(str(state_path)))
    with torch.no_grad():
        return plain.encode_image(x)


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.slow
def test_preview_apply_show_revert(setup):
    tmp, model, model_args, dict_args = setup
    scale = ["--operator", "sith_scale"]
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--top", "3", *scale, "--json"])
    assert code == 0, out
    plan = json.loads(out)
    assert len(plan["affected"]) == 3 and plan["heads"] and plan["concept_alignment"]

    first = tmp / "red.safetensors"
    code, out = _run(["edit", "apply", *model_args, *dict_args, "--concept", "red", "--top", "3", *scale,
                      "--out", str(first)])
    assert code == 0, out
    code, out = _run(["edit", "show", str(first)])
    assert code == 0 and "suppress red with sith_scale" in out and "3 singular value(s)" in out
    assert len(out.splitlines()) < 40  # a summary, not the raw manifest
    code, out = _run(["edit", "show", str(first), "--json"])
    manifest = json.loads(out)
    assert len(manifest["multipliers"]["changed"]) == 3
    assert [[a["layer"], a["head"], a["index"]] for a in manifest["affected"]] == \
           [[a["layer"], a["head"], a["index"]] for a in plan["affected"]]

    # a second edit composed onto the first via a spec file, then the first removed again
    spec = {"model": "tiny", "operations": [{"concepts": ["blue"], "action": "scale", "strength": 0.5,
                                             "layers": [1], "select": {"rule": "top_n", "n": 2}}]}
    (tmp / "blue.json").write_text(json.dumps(spec))
    blue = tmp / "blue.safetensors"
    code, out = _run(["edit", "apply", *model_args, *dict_args, "--spec", str(tmp / "blue.json"), "--out", str(blue)])
    assert code == 0, out
    from sith.edits.multipliers import Multipliers

    both = Multipliers.load(tmp / "red.edit.safetensors").compose(Multipliers.load(tmp / "blue.edit.safetensors"))
    both.save(tmp / "both.edit.safetensors")
    composed = tmp / "both.safetensors"
    code, out = _run(["edit", "apply", *model_args, "--multipliers", str(tmp / "both.edit.safetensors"),
                      "--out", str(composed)])
    assert code == 0, out
    x = images()
    base = model.encode_image(x).detach()
    assert (_embed(composed, x) - _embed(first, x)).abs().max() > 1e-4

    # remove "red" (α = 0 cannot be divided: refused), then remove "blue" (α = 0.5: fine)
    code, out = _run(["edit", "revert", str(composed), *model_args, "--remove", str(tmp / "red.edit.safetensors"),
                      "--out", str(tmp / "x.safetensors")])
    assert code == 2 and "α = 0" in out
    only_red = tmp / "only-red.safetensors"
    code, out = _run(["edit", "revert", str(composed), *model_args, "--remove", str(tmp / "blue.edit.safetensors"),
                      "--out", str(only_red)])
    assert code == 0, out
    assert (_embed(only_red, x) - _embed(first, x)).abs().max() < 1e-5
    restored = tmp / "restored.safetensors"
    code, out = _run(["edit", "revert", str(composed), *model_args, "--out", str(restored)])
    assert code == 0, out
    assert (_embed(restored, x) - base).abs().max() < 1e-5


@pytest.mark.slow
def test_debias_and_anchor_options_reach_the_plan(setup):
    tmp, model, model_args, dict_args = setup
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--action", "debias", "--json"])
    assert code == 0, out
    op = json.loads(out)["spec"]["operations"][0]
    assert op["action"] == "debias" and op["target"] == DEFAULT_DEBIAS_TARGET and op["anchor"] == "auto"
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--anchor", "blue", "--json"])
    assert code == 0, out
    plan = json.loads(out)
    assert plan["spec"]["operations"][0]["anchor"] == "blue" and any("anchored to 'blue'" in n for n in plan["notes"])
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--anchor", "bleu"])
    assert code == 2 and "operations[0].anchor" in out and "blue" in out


@pytest.mark.slow
def test_default_command_is_target_driven_and_previews_its_effect(setup):
    tmp, model, model_args, dict_args = setup
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--json"])
    assert code == 0, out
    plan = json.loads(out)
    op = plan["spec"]["operations"][0]
    assert op["operator"] == "head_mlp_orthogonal" and op["select"] == {"rule": "auto"}
    assert op["target"] == DEFAULT_SUPPRESS_TARGET
    red = next(e for e in plan["predicted"] if e["concept"] == "red")
    # the planner aims at the target corrected by red's prior (docs/edits.md), and says so in a note
    aimed = float(next(n for n in plan["notes"] if "aimed at" in n).rsplit(" ", 1)[1])
    assert red["role"] == "target" and red["after"] == pytest.approx(aimed, abs=1e-3)
    assert {e["concept"] for e in plan["predicted"] if e["role"] == "preserve"} == {"blue", "green", "yellow"}
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--layers", "0",
                      "--target", "0"])
    assert code == 0 and "[unreachable]" in out and "not reachable" in out and "Predicted presence" in out
    out_path = tmp / "red-default.safetensors"
    code, out = _run(["edit", "apply", *model_args, *dict_args, "--concept", "red", "--out", str(out_path)])
    assert code == 0, out
    code, out = _run(["edit", "show", str(out_path)])
    assert "head_mlp_orthogonal" in out and "write map(s)" in out and "MLP output(s)" in out
    assert "predicted presence" in out
    restored = tmp / "restored-default.safetensors"
    code, out = _run(["edit", "revert", str(out_path), *model_args, "--out", str(restored)])
    assert code == 0, out
    x = images()
    assert (_embed(restored, x) - model.encode_image(x).detach()).abs().max() < 1e-5
    assert (_embed(out_path, x) - model.encode_image(x).detach()).abs().max() > 1e-4
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--preserve", "bleu"])
    assert code == 2 and "operations[0].preserve[0]" in out and "blue" in out


def test_bad_input_is_one_clear_line(setup):
    tmp, _, model_args, dict_args = setup
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "watter"])
    assert code == 2 and "operations[0].concepts[0]" in out and "water" in out
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--threshold", "40"])
    assert code == 2 and "nothing was changed" in out
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--action", "scale",
                      "--strength", "nan"])
    assert code == 2 and "operations[0].strength" in out
    code, out = _run(["edit", "preview", *model_args, *dict_args, "--concept", "red", "--action", "amplify",
                      "--strength", "25"])
    assert code == 2 and "<= 10" in out
