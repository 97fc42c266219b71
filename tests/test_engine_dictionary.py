"""Vocabularies, cut-context text encoding, dictionary centring and the artifact caches."""

from __future__ import annotations

import json
import re

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sith.engine.cache import (
    ArtifactCache,
    DiskCache,
    MemoryCache,
    data_dir,
    tensors_from_bytes,
    tensors_to_bytes,
)
from sith.engine.dictionary import (
    STOP_WORDS,
    build_dictionary,
    clean_concepts,
    concepts_hash,
    default_vocabulary,
    dictionary_cache_key,
    encode_texts,
    read_vocabulary,
)
from sith.engine.errors import InvalidInput
from sith.engine.models import load_model

TINY_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TEXTS = ["cat", "a red double-decker bus parked near the old town hall", "x", "glass", "ü café",
         " ".join(["very"] * 90)]  # longer than the context: the tokenizer truncates


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CFG)
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return load_model(config=folder)


def test_default_vocabulary_is_filtered_and_deterministic():
    vocab = default_vocabulary()
    assert len(vocab) >= 20_000
    assert vocab == default_vocabulary()
    assert len(set(vocab)) == len(vocab)
    assert all(re.fullmatch(r"[a-z]{3,}", w) for w in vocab)
    assert not STOP_WORDS & set(vocab)
    assert {"red", "water", "car"} <= set(vocab)


def test_read_vocabulary(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("# colours\n red \n\nblue\nred\n  # indented comment\ndark green\n", encoding="utf-8")
    assert read_vocabulary(path) == ["red", "blue", "dark green"]


@pytest.mark.parametrize("text", ["", "\n# only a comment\n\n", "cat\ncat\n cat \n"])
def test_empty_or_duplicate_only_vocabularies_are_rejected(tmp_path, text):
    path = tmp_path / "v.txt"
    path.write_text(text)
    with pytest.raises(InvalidInput) as err:
        read_vocabulary(path)
    assert err.value.field == "dictionary"


def test_missing_or_binary_vocabulary_file(tmp_path):
    with pytest.raises(InvalidInput, match="not found"):
        read_vocabulary(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(InvalidInput, match="UTF-8"):
        read_vocabulary(tmp_path / "bin.txt")
    with pytest.raises(InvalidInput):
        clean_concepts(["cat", 3])


def test_cut_context_equals_full_encode_text(tiny):
    with torch.no_grad():
        full = tiny.model.encode_text(tiny.tokenizer(TEXTS))
    for batch_size in (1, 4, 256):
        cut = encode_texts(tiny, TEXTS, batch_size=batch_size)
        assert (cut - full).abs().max() < 1e-5
    assert (encode_texts(tiny, TEXTS, cut_context=False) - full).abs().max() < 1e-5


@pytest.mark.slow
def test_cut_context_equals_full_encode_text_vit_b32():
    torch.manual_seed(1)
    loaded = load_model("ViT-B-32")
    texts = default_vocabulary()[:50] + TEXTS
    with torch.no_grad():
        full = loaded.model.encode_text(loaded.tokenizer(texts))
    assert (encode_texts(loaded, texts, batch_size=16) - full).abs().max() < 1e-5


def test_build_dictionary_centres_and_caches(tiny, tmp_path):
    concepts = ["red", "blue", "green", "a dog on a beach", "red"]
    cache = MemoryCache()
    d = build_dictionary(tiny, concepts, cache=cache)
    assert d.concepts == ["red", "blue", "green", "a dog on a beach"]
    assert d.hash == concepts_hash(d.concepts)
    raw = encode_texts(tiny, d.concepts)
    torch.testing.assert_close(d.embeddings, F.normalize(raw, dim=1))
    torch.testing.assert_close(d.centred, F.normalize(d.embeddings - d.embeddings.mean(0), dim=1))
    assert len(cache) == 1
    # a second build reads the cached bytes instead of re-encoding
    key = dictionary_cache_key(tiny, d.hash)
    planted = torch.randn(4, 24)
    cache.put(key, tensors_to_bytes({"embeddings": planted}))
    again = build_dictionary(tiny, d.concepts, cache=cache)
    torch.testing.assert_close(again.embeddings, F.normalize(planted, dim=1))


def test_disk_cache_default_location(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SITH_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    path = tmp_path / "v.txt"
    path.write_text("sun\nmoon\nstar\n")
    d = build_dictionary(tiny, path)
    files = list((tmp_path / "dictionaries").iterdir())
    assert len(files) == 1 and files[0].suffix == ".bin"
    torch.testing.assert_close(build_dictionary(tiny, path).centred, d.centred)
    other = build_dictionary(tiny, ["sun", "moon"], cache_dir=tmp_path / "elsewhere")
    assert len(list((tmp_path / "elsewhere").iterdir())) == 1
    assert other.hash != d.hash


def test_index_and_closest(tiny):
    d = build_dictionary(tiny, ["red", "green", "blue", "reddish"], cache=MemoryCache())
    assert d.index("blue") == 2
    assert set(d.closest("redd")[:2]) == {"red", "reddish"}
    with pytest.raises(InvalidInput) as err:
        d.index("gren")
    assert err.value.field == "concept"
    assert "green" in err.value.suggestions


def test_caches_round_trip(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.long)}
    data = tensors_to_bytes(tensors)
    back = tensors_from_bytes(data)
    torch.testing.assert_close(back["a"], tensors["a"])
    assert back["b"].dtype == torch.long
    for cache in (MemoryCache(), DiskCache(tmp_path / "c")):
        assert isinstance(cache, ArtifactCache)
        assert cache.get("decomposition/abc:1") is None
        cache.put("decomposition/abc:1", data)
        cache.put("decomposition/abc_1", b"other")  # sanitises alike, must not collide
        assert cache.get("decomposition/abc:1") == data
        assert cache.get("decomposition/abc_1") == b"other"


def test_progress_reports_every_concept(tiny):
    seen: list[tuple[str, int]] = []
    advanced: list[int] = []

    def progress(description: str, total: int):
        seen.append((description, total))
        return advanced.append

    build_dictionary(tiny, ["one", "two", "three", "four", "five"], cache=MemoryCache(), progress=progress)
    assert seen == [("Encoding concepts", 5)]
    assert sum(advanced) == 5


# ------------------------------------------------------------------ shared cache key and precision


def _tiny_twin(tiny, tmp_path, change_vision: bool = False, change_text: bool = False):
    """A second load of the tiny model's weights, optionally with the vision or text tower altered."""
    import copy
    import dataclasses

    from sith.engine.models import vision_hash

    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        if change_vision:
            model.visual.proj.mul_(1.5)
        if change_text:
            model.text_projection.mul_(1.5)
    return dataclasses.replace(tiny, model=model, hash=vision_hash(model))


def test_dictionary_key_depends_on_text_tower_and_vocabulary_only(tiny, tmp_path, monkeypatch):
    concepts = ["sun", "moon", "star"]
    cache = MemoryCache()
    first = build_dictionary(tiny, concepts, cache=cache)
    other_vision = _tiny_twin(tiny, tmp_path, change_vision=True)
    assert other_vision.hash != tiny.hash
    assert dictionary_cache_key(other_vision, first.hash) == dictionary_cache_key(tiny, first.hash)
    import sith.engine.dictionary as dictionary

    def no_encoding(*args, **kwargs):
        raise AssertionError("re-encoded a dictionary the cache holds")

    monkeypatch.setattr(dictionary, "encode_texts", no_encoding)
    shared = build_dictionary(other_vision, concepts, cache=cache)  # another vision tower, same text tower
    torch.testing.assert_close(shared.centred, first.centred)
    other_text = _tiny_twin(tiny, tmp_path, change_text=True)
    assert dictionary_cache_key(other_text, first.hash) != dictionary_cache_key(tiny, first.hash)
    assert dictionary_cache_key(tiny, concepts_hash(["sun", "moon"])) != dictionary_cache_key(tiny, first.hash)


def test_text_tower_hash_follows_in_place_changes(tiny, tmp_path):
    from sith.engine.dictionary import text_tower_hash
    from sith.engine.models import text_hash

    twin = _tiny_twin(tiny, tmp_path)
    before = text_tower_hash(twin)
    assert before == text_hash(twin.model) == text_tower_hash(tiny)
    with torch.no_grad():
        twin.model.text_projection.mul_(2.0)
    assert text_tower_hash(twin) == text_hash(twin.model) != before


def test_precision_rules(tiny):
    from sith.engine.dictionary import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    if torch.cuda.is_available():
        assert resolve_precision("auto", "cuda") == "fp16"
    for bad, device in (("fp16", "cpu"), ("bf16", "cpu"), ("half", "cpu")):
        with pytest.raises(InvalidInput) as err:
            resolve_precision(bad, device)
        assert err.value.field == "precision"
    with pytest.raises(InvalidInput):
        build_dictionary(tiny, ["a", "b"], cache=MemoryCache(), precision="fp8")


def test_half_precision_entries_serve_auto_but_not_explicit_fp32(tiny):
    concepts = ["sun", "moon", "star"]
    cache = MemoryCache()
    key = dictionary_cache_key(tiny, concepts_hash(concepts))
    planted = torch.randn(3, 24)
    cache.put(key, tensors_to_bytes({"embeddings": planted}, {"precision": "fp16"}))
    auto = build_dictionary(tiny, concepts, cache=cache)  # what a GPU worker encoded is good enough
    torch.testing.assert_close(auto.embeddings, F.normalize(planted, dim=1))
    exact = build_dictionary(tiny, concepts, cache=cache, precision="fp32")  # re-encodes and upgrades
    torch.testing.assert_close(exact.embeddings, F.normalize(encode_texts(tiny, concepts), dim=1))
    from sith.engine.cache import tensors_metadata

    assert tensors_metadata(cache.get(key))["precision"] == "fp32"


def test_unreadable_cache_entry_is_re_encoded(tiny):
    concepts = ["sun", "moon"]
    cache = MemoryCache()
    cache.put(dictionary_cache_key(tiny, concepts_hash(concepts)), b"\x05\x00\x00")
    d = build_dictionary(tiny, concepts, cache=cache)
    torch.testing.assert_close(d.embeddings, F.normalize(encode_texts(tiny, concepts), dim=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_gpu_encoding_is_close_to_fp32(tiny):
    import dataclasses

    gpu = dataclasses.replace(tiny, model=tiny.model.to("cuda"))
    try:
        half = encode_texts(gpu, TEXTS, precision="fp16")
        full = encode_texts(gpu, TEXTS, precision="fp32")
    finally:
        tiny.model.to("cpu")
    assert half.device.type == "cpu" and half.dtype == torch.float32
    assert F.cosine_similarity(half, full).min() > 0.999
