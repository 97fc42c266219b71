"""`sith decompose`, `sith explain`, `sith find` end to end on a tiny saved CLIP (and the testbed model)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sith.cli import main
from sith.engine.analysis import Analyzer
from sith.engine.decomposition import decompose
from sith.engine.dictionary import build_dictionary
from sith.testbed import vocabulary as testbed_words
from sith.engine.models import load_model

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
WORDS = ["red", "blue", "green", "dog", "cat", "horse", "car", "boat", "beach", "forest", "city", "kitchen",
         "metal", "wood", "glass", "man", "woman", "child", "letter", "number", "snow", "fire", "water", "grass"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(1)
    model = open_clip.model.CLIP(**TINY_CFG)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_decompose_json_and_safetensors(model_dir, tmp_path) -> None:
    out = tmp_path / "svd.safetensors"
    code, stdout, _ = run("decompose", "--config", str(model_dir), "-l", "-1", "-l", "0", "--json", "--out", str(out))
    assert code == 0
    payload = json.loads(stdout)
    expected = decompose(load_model(config=model_dir), [0, 2])
    assert [entry["layer"] for entry in payload["layers"]] == [0, 2]
    for entry in payload["layers"]:
        sigma = torch.tensor([head["sigma"] for head in entry["heads"]])
        torch.testing.assert_close(sigma, expected[entry["layer"]].S)
    saved = load_file(str(out))
    svd = expected[2]
    torch.testing.assert_close(saved["layer2.U"] @ torch.diag_embed(saved["layer2.S"]) @ saved["layer2.V"].transpose(1, 2),
                               svd.U @ torch.diag_embed(svd.S) @ svd.V.transpose(1, 2))


def test_decompose_table(model_dir) -> None:
    code, stdout, _ = run("decompose", "--config", str(model_dir), "--top", "2")
    assert code == 0
    svd = decompose(load_model(config=model_dir))
    for layer, heads in svd.items():
        for sigma in heads.S:
            assert f"{sigma[0]:.3f} │ {sigma[1]:.3f}" in stdout


def test_explain_json_matches_the_engine(model_dir, vocab, data_dir) -> None:
    code, stdout, _ = run("explain", "--config", str(model_dir), "--dictionary", str(vocab), "-k", "3", "--json")
    assert code == 0
    payload = json.loads(stdout)
    loaded = load_model(config=model_dir)
    dictionary = build_dictionary(loaded, WORDS, cache_dir=data_dir / "dictionaries")
    expected = Analyzer(loaded, dictionary).explain(k=3, vectors=3)
    assert len(payload["heads"]) == 3 * 4  # every head of the (three) last layers
    for got, want in zip(payload["heads"], expected):
        assert (got["layer"], got["head"]) == (want.layer, want.head)
        assert [[c for c, _ in v["concepts"]] for v in got["vectors"]] == [[c for c, _ in v.concepts] for v in want.vectors]
        assert [c for c, _ in got["theme"]] == [c for c, _ in want.theme]
    assert any((data_dir / "artifacts").iterdir())  # codes and SVDs were cached on disk


def test_explain_single_head_table_with_fidelity(model_dir, vocab) -> None:
    code, stdout, _ = run("explain", "--config", str(model_dir), "--dictionary", str(vocab),
                          "--layer", "-1", "--head", "2", "--vectors", "4", "--fidelity", "--method", "nnomp")
    assert code == 0
    assert "layer 2 head 2" in stdout and "fidelity" in stdout and "theme:" in stdout


def test_find_json_ranks_hits(model_dir, vocab) -> None:
    code, stdout, _ = run("find", "dog", "boat", "--config", str(model_dir), "--dictionary", str(vocab),
                          "--top", "5", "--json")
    assert code == 0
    hits = json.loads(stdout)["hits"]
    assert len(hits) == 5
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert {h["matched"] for h in hits} <= {"dog", "boat"}
    code, stdout, _ = run("find", "dog", "--config", str(model_dir), "--dictionary", str(vocab), "--top", "3")
    assert code == 0 and "relevance" in stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["find", "dgo"], "concepts[0]: 'dgo' is not in the dictionary (did you mean: dog"),
        (["explain", "-k", "0"], "k: must be a positive integer"),
        (["explain", "--layer", "9"], "layers: layer 9 is out of range"),
        (["explain", "--coherence", "-0.5"], "coherence: must be >= 0"),
        (["explain", "--image-mean", "nowhere.pt"], "image_mean:"),
        (["explain", "--min-confidence", "1.5"], "min_confidence: must be between 0 and 1"),
        (["find", "dog", "--min-confidence", "-0.1"], "min_confidence: must be between 0 and 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(model_dir, vocab, args, fragment) -> None:
    code, stdout, stderr = run(*args, "--config", str(model_dir), "--dictionary", str(vocab))
    assert code == 2
    assert fragment in stderr and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [stderr.strip().splitlines()[-1]]


def test_missing_dictionary_file(model_dir, tmp_path) -> None:
    code, _, stderr = run("explain", "--config", str(model_dir), "--dictionary", str(tmp_path / "none.txt"))
    assert code == 2 and "dictionary: file not found" in stderr


@pytest.mark.slow
def test_explain_default_model_and_vocabulary() -> None:
    """`sith explain` with no arguments: the shipped testbed model, explained over its world's words;
    `--dictionary default` switches to the built-in English vocabulary (encoded once, then cached)."""
    code, stdout, _ = run("explain", "--json")
    assert code == 0
    payload = json.loads(stdout)
    assert payload["model"] == "testbed-main" and payload["heads"]
    assert payload["dictionary_size"] == len(testbed_words.testbed_vocabulary())
    code, stdout, _ = run("explain", "--json", "--dictionary", "default", "-l", "-1")
    assert code == 0 and json.loads(stdout)["dictionary_size"] >= 20_000


def test_explain_shows_confidence_and_says_what_fidelity_means(model_dir, vocab) -> None:
    code, stdout, _ = run("explain", "--config", str(model_dir), "--dictionary", str(vocab),
                          "--layer", "-1", "--head", "0", "--vectors", "5", "--fidelity")
    assert code == 0
    assert "conf" in stdout and "0 or negative" in stdout
    code, stdout, _ = run("explain", "--config", str(model_dir), "--dictionary", str(vocab), "--json")
    vectors = [v for h in json.loads(stdout)["heads"] for v in h["vectors"]]
    assert vectors and all(0.0 <= v["confidence"] <= 1.0 for v in vectors)


def test_min_confidence_hides_unsure_explanations(model_dir, vocab) -> None:
    code, stdout, _ = run("explain", "--config", str(model_dir), "--dictionary", str(vocab), "--json")
    confidences = sorted(v["confidence"] for h in json.loads(stdout)["heads"] for v in h["vectors"])
    cut = confidences[len(confidences) // 2]
    code, stdout, _ = run("explain", "--config", str(model_dir), "--dictionary", str(vocab), "--json",
                          "--min-confidence", str(cut))
    kept = [v["confidence"] for h in json.loads(stdout)["heads"] for v in h["vectors"]]
    assert code == 0 and kept and all(c >= cut for c in kept) and len(kept) < len(confidences)
    code, stdout, _ = run("find", "dog", "--config", str(model_dir), "--dictionary", str(vocab), "--json",
                          "--top", "3", "--min-confidence", str(cut))
    hits = json.loads(stdout)["hits"]
    assert code == 0 and len(hits) <= 3 and all(h["confidence"] >= cut for h in hits)


@pytest.mark.slow
def test_testbed_tables_mark_words_outside_the_world() -> None:
    code, stdout, _ = run("explain", "--json", "-l", "-1")
    payload = json.loads(stdout)
    assert set(payload["world_words"]) == set(testbed_words.world_words())
    code, stdout, _ = run("explain", "-l", "-1", "--dictionary", "default", "--head", "0")
    assert code == 0 and "°" in stdout  # English words are not world words: every table marks them
