"""An edited model is a complete model: folder and single-file exports reopen with plain open_clip and
with every `sith` command, and every model name the project uses is accepted everywhere."""

from __future__ import annotations

import json
import os
import stat

import open_clip
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from edits_fixtures import TINY_CFG, images, tiny_clip
from sith.cli import main
from sith.cli.refs import load_cli_model
from sith.edits.export import (
    CONFIG_KEY,
    FOLDER_CONFIG,
    FOLDER_MANIFEST,
    FOLDER_WEIGHTS,
    MANIFEST_KEY,
    export_model,
    multipliers_path,
    read_config,
    read_manifest,
    read_metadata,
    unpack_checkpoint,
)
from sith.engine.errors import InvalidInput
from sith.engine.models import load_model, load_reference

PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture()
def tiny(tmp_path) -> tuple:
    """A tiny CLIP saved as an open_clip folder, loaded through sith (so it knows its config)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    model = tiny_clip()
    (folder / FOLDER_CONFIG).write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": PREPROCESS}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / FOLDER_WEIGHTS))
    return load_reference(str(folder)), model


def _edited(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with one weight changed, so an export of it cannot be mistaken for the base."""
    clip = tiny_clip()
    clip.load_state_dict(model.state_dict())
    with torch.no_grad():
        clip.visual.transformer.resblocks[-1].attn.out_proj.weight.mul_(0.5)
    return clip


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loader_records_the_config_it_built_from(tiny):
    loaded, _ = tiny
    assert loaded.config["model_cfg"] == TINY_CFG
    assert loaded.config["preprocess_cfg"]["mean"] == PREPROCESS["mean"]


def test_folder_export_opens_with_plain_open_clip_and_sith(tiny, tmp_path):
    loaded, model = tiny
    edited = _edited(model)
    out = export_model(edited, tmp_path / "red-free", {"base_hash": loaded.hash}, loaded.config)
    assert sorted(p.name for p in out.iterdir()) == sorted([FOLDER_CONFIG, FOLDER_WEIGHTS, FOLDER_MANIFEST])
    plain = open_clip.create_model(f"local-dir:{out}").eval()
    assert _same_weights(plain, edited)
    x = images()
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(x), edited.encode_image(x))
    reopened = load_reference(str(out))
    assert _same_weights(reopened.model, edited) and reopened.hash != loaded.hash
    assert reopened.config["model_cfg"] == TINY_CFG
    assert load_cli_model(None, checkpoint=str(out)).hash == reopened.hash  # --checkpoint FOLDER
    assert load_cli_model(str(out)).hash == reopened.hash  # --model FOLDER
    assert read_manifest(out)["base_hash"] == loaded.hash
    assert json.loads((out / FOLDER_MANIFEST).read_text())["base_hash"] == loaded.hash
    assert read_config(out)["model_cfg"] == TINY_CFG
    for name in (FOLDER_WEIGHTS, FOLDER_CONFIG):  # shareable like the config: not 0600
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644


def test_single_file_carries_its_config_and_reopens(tiny, tmp_path):
    loaded, model = tiny
    edited = _edited(model)
    path = export_model(edited, tmp_path / "red-free.safetensors", {"base_hash": loaded.hash}, loaded.config)
    with safe_open(str(path), framework="pt") as handle:  # the plain-Python header reader agrees
        assert handle.metadata() == read_metadata(path)
        assert set(handle.keys()) == set(edited.state_dict())  # no extra tensors
    assert json.loads(read_metadata(path)[CONFIG_KEY])["model_cfg"] == TINY_CFG
    assert MANIFEST_KEY in read_metadata(path)
    by_reference = load_reference(str(path))
    by_checkpoint = load_model(checkpoint=path)
    assert by_reference.hash == by_checkpoint.hash == load_cli_model(str(path)).hash
    assert _same_weights(by_reference.model, edited) and by_reference.name == "red-free"
    folder = unpack_checkpoint(path, tmp_path / "unpacked")
    assert _same_weights(open_clip.create_model(f"local-dir:{folder}"), edited)
    assert read_manifest(folder)["base_hash"] == loaded.hash
    assert multipliers_path(path).name == "red-free.edit.safetensors"
    assert multipliers_path(tmp_path / "red-free") == tmp_path / "red-free" / "sith_multipliers.edit.safetensors"


def test_exports_without_an_architecture_are_refused(tiny, tmp_path):
    _, model = tiny
    with pytest.raises(InvalidInput) as err:
        export_model(model, tmp_path / "x", {})  # a bare CLIP does not know its config
    assert err.value.field == "model_cfg"
    with pytest.raises(InvalidInput) as err:
        export_model(model, tmp_path / "x", {}, {"embed_dim": 3})
    assert err.value.field == "model_cfg"
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    with pytest.raises(InvalidInput) as err:
        load_reference(str(bare))
    assert "architecture" in err.value.reason
    with pytest.raises(InvalidInput):
        read_manifest(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(InvalidInput):
        read_metadata(tmp_path / "junk.safetensors")


def test_shipped_names_refine_with_checkpoint_options(tiny, tmp_path):
    from sith.cli.refs import checkpoint_folder
    from sith.engine.models import shipped_folder

    assert shipped_folder("testbed-main") is not None and shipped_folder("ViT-B-32") is None
    assert shipped_folder("../testbed-main") is None
    assert checkpoint_folder("default") == shipped_folder("testbed-main")
    with pytest.raises(InvalidInput) as err:
        load_cli_model(None, pretrained="openai")
    assert err.value.field == "--pretrained"


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_every_command_takes_every_model_name(tmp_path, monkeypatch):
    """The names from the README tour (testbed-main, testbed-small, folders, exported files) in every
    command family: analysis, edit, adapt (delta, spectra, finetune) and testbed evaluate."""
    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    hits = json.loads(_run(["find", "red", "--model", "testbed-main", "--top", "3", "--json"]))
    assert hits["model"] == "testbed-main" and hits["hits"][0]["matched"] == "red"
    assert json.loads(_run(["find", "red", "--model", "testbed-small", "--top", "1", "--json"]))["model"] == "testbed-small"

    _run(["edit", "apply", "--model", "testbed-main", "--concept", "red", "--out", "red-free"])
    _run(["edit", "apply", "--concept", "red", "--out", "red-free.safetensors"])
    assert (tmp_path / "red-free" / FOLDER_CONFIG).is_file()
    assert (tmp_path / "red-free" / "sith_multipliers.edit.safetensors").is_file()
    assert (tmp_path / "red-free.edit.safetensors").is_file()
    folder_hash = load_reference("red-free").hash
    assert load_reference("red-free.safetensors").hash == folder_hash  # the same edit, two forms

    for args in (["--model", "red-free"], ["--checkpoint", "red-free"], ["--model", "red-free.safetensors"],
                 ["--checkpoint", "red-free.safetensors"]):
        explained = json.loads(_run(["explain", *args, "-l", "-1", "--head", "0", "--json"]))
        assert explained["hash"] == folder_hash, args

    delta = json.loads(_run(["adapt", "delta", "testbed-main", "red-free", "--vocabulary", "testbed", "--json"]))
    assert delta["top_heads"] and delta["top_heads"][0]["relative"] > 0
    _run(["adapt", "plot", "spectra", "testbed-main", "--finetuned", "red-free.safetensors", "--out", "spectra"])
    assert (tmp_path / "spectra.png").is_file()

    _run(["testbed", "evaluate", "red-free", "--n-factor", "40", "--n-spurious", "8", "--n-retrieval", "10"])
    written = json.loads((tmp_path / "red-free.eval.json").read_text())
    assert written["hash"] == folder_hash and "zero_shot" in written

    _run(["adapt", "finetune", "testbed-small", "tuned", "--steps", "1", "--batch-size", "4"])
    assert load_reference(str(tmp_path / "tuned")).info == load_reference("testbed-small").info


def test_exports_are_byte_identical_every_time(tiny, tmp_path):
    """Several metadata keys come out of safetensors in hash order; the export sorts them, so a
    re-export (a retried job) keeps its sha256 and the file stays valid safetensors."""
    loaded, model = tiny
    manifest = {"base_hash": loaded.hash, "spec": {"operations": [{"concepts": ["red"]}]}, "zeta": 1, "alpha": 2}
    first = export_model(model, tmp_path / "a.safetensors", manifest, loaded.config).read_bytes()
    for i in range(6):  # separate writes: the hash order differs between them
        again = export_model(model, tmp_path / f"b{i}.safetensors", manifest, loaded.config)
        assert again.read_bytes() == first
    length = int.from_bytes(first[:8], "little")
    header = json.loads(first[8 : 8 + length])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert load_reference(str(tmp_path / "b0.safetensors")).hash == loaded.hash
