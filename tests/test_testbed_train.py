"""Trainer: schedule, loss, presets, and a short run that saves a plain open_clip checkpoint."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sith.engine.errors import InvalidInput
from sith.engine.models import load_model
from sith.testbed.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint
from sith.testbed.spurious import MAIN_MIX
from sith.testbed.train import (
    BatchStream,
    LabelHeads,
    Preset,
    TrainConfig,
    clip_loss,
    list_presets,
    load_preset,
    lr_factor,
    train,
)

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "head_width": 16, "layers": 2, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


def test_lr_warms_up_then_decays_to_zero():
    values = [lr_factor(s, warmup=10, total=100) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-9)


def test_clip_loss_rewards_matching_pairs():
    features = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(math.log(100.0))
    matched = clip_loss(features, features, scale)
    shuffled = clip_loss(features, features.roll(1, 0), scale)
    same = clip_loss(features[:1].expand(8, -1), features[:1].expand(8, -1), scale)
    assert matched < 0.5 < shuffled
    assert same == pytest.approx(math.log(8), rel=1e-4)  # all pairs identical: chance


def test_shipped_presets_load_and_differ():
    assert {"main", "small"} <= set(list_presets())
    main, small = load_preset("main"), load_preset("testbed-small")
    assert main.name == "testbed-main" and small.name == "testbed-small"
    for key in ("width", "layers"):
        assert main.model_cfg["vision_cfg"][key] != small.model_cfg["vision_cfg"][key]
    assert main.train.seed != small.train.seed
    stages = main.stage_configs()
    assert len(stages) == 3 and stages[0].contrastive_weight == 0 and stages[0].label_loss == {"shape": 1.0}
    assert len({s.seed for s in stages}) == 3  # every stage sees new data
    assert all(s.batch_size == main.train.batch_size for s in stages)  # stages inherit the base config
    with pytest.raises(InvalidInput) as err:
        load_preset("mian")
    assert "main" in err.value.suggestions


def test_hard_negative_groups_share_background_and_colour():
    stream = BatchStream(MAIN_MIX, seed=4, batch_size=12, steps=2, group=4)
    batch = stream[1]
    assert batch.captions == stream[1].captions  # deterministic
    groups = [batch.scenes[i : i + 4] for i in range(0, 12, 4)]
    for members in groups:
        assert len({(s.background, s.colour) for s in members}) == 1
    assert len({s.shape for s in batch.scenes}) > 3  # the rest still varies
    assert len({(g[0].background, g[0].colour) for g in groups}) > 1
    with pytest.raises(InvalidInput):
        BatchStream(MAIN_MIX, seed=0, batch_size=10, steps=1, group=4)
    with pytest.raises(InvalidInput):
        BatchStream(MAIN_MIX, seed=0, batch_size=8, steps=1, group=4, shared=("shape",))


def test_shape_only_groups_differ_in_shape_alone():
    shared = ("colour", "texture", "size", "count")
    batch = BatchStream(MAIN_MIX, seed=5, batch_size=36, steps=1, group=6, shared=shared)[0]
    for i in range(0, 36, 6):
        members = batch.scenes[i : i + 6]
        keys = {(s.background, s.colour, s.texture, s.size, s.count, s.position) for s in members}
        assert len(keys) == 1
        assert all((s.position is None) == (s.count > 1) for s in members)
    assert len({s.shape for s in batch.scenes}) >= 6


def test_stage_configs_are_checked_before_any_training():
    cases = [
        (TrainConfig(steps=1, contrastive_weight=0.0), "contrastive or a label loss"),
        (TrainConfig(steps=1, label_loss={"shape": -1.0}), ">= 0"),
        (TrainConfig(steps=1, label_loss={"mood": 1.0}), "no labels"),
    ]
    for cfg, reason in cases:
        with pytest.raises(InvalidInput) as err:
            train(Preset("bad", TINY_CFG, cfg), device="cpu", log=lambda _: None)
        assert reason in err.value.reason
    bad_stage = Preset("bad", TINY_CFG, TrainConfig(steps=1), stages=[TrainConfig(steps=1), TrainConfig(steps=0)])
    with pytest.raises(InvalidInput) as err:
        train(bad_stage, device="cpu", log=lambda _: None)
    assert err.value.field == "stages[1]"


def test_label_heads_ignore_missing_labels():
    heads = LabelHeads(16, ["shape", "position"])
    embedding = torch.randn(4, 16)
    labels = {"shape": torch.tensor([0, 1, 2, 3]), "position": torch.tensor([-1, -1, 2, -1])}
    losses = heads.losses(embedding, labels)
    assert set(losses) == {"shape", "position"} and all(torch.isfinite(v) for v in losses.values())
    only = F.cross_entropy(heads.heads["position"](embedding[2:3]), labels["position"][2:3])
    assert torch.allclose(losses["position"], only)


def test_training_seed_must_not_overlap_heldout():
    preset = Preset("bad", TINY_CFG, TrainConfig(seed=2_000_000, steps=1))
    with pytest.raises(InvalidInput):
        train(preset)


@pytest.mark.slow
def test_short_run_saves_a_plain_open_clip_checkpoint(tmp_path):
    preset = Preset("tiny", TINY_CFG, TrainConfig(seed=3, steps=30, batch_size=8, lr=2e-3, warmup_steps=5,
                                                  threads=1, log_every=10, distribution="natural"))
    summary = train(preset, out_dir=tmp_path, device="cpu", log=lambda _: None)
    assert math.isfinite(summary["final_loss"]) and summary["samples_seen"] == 240
    assert summary["history"][-1]["step"] == 29 and summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert {CONFIG_NAME, WEIGHTS_NAME, "train.json"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["model_cfg"] == TINY_CFG

    model, tokenizer = load_checkpoint(tmp_path)  # plain open_clip, local-dir: schema
    stored = load_file(str(tmp_path / WEIGHTS_NAME))
    assert all(torch.equal(model.state_dict()[k].float(), v.float()) for k, v in stored.items())
    assert isinstance(tokenizer, open_clip.SimpleTokenizer) and tokenizer.context_length == 32
    loaded = load_model(config=tmp_path)  # and the engine's loader
    assert loaded.info.layers == 2 and loaded.info.heads == 2

    # A second stage starts from those weights (zero learning rate: nothing may change).
    again = Preset("tiny", TINY_CFG, TrainConfig(seed=4, steps=1, batch_size=8, lr=0.0, warmup_steps=1, threads=1,
                                                 init_from=str(tmp_path), distribution="natural"))
    train(again, out_dir=tmp_path / "stage2", device="cpu", log=lambda _: None)
    resumed = load_file(str(tmp_path / "stage2" / WEIGHTS_NAME))
    assert all(torch.equal(resumed[k], v) for k, v in stored.items())
    with pytest.raises(InvalidInput):
        train(Preset("tiny", TINY_CFG, TrainConfig(steps=1, init_from=str(tmp_path / "nowhere"))))


@pytest.mark.slow
def test_label_warmup_then_contrastive_stages_save_only_the_clip_weights(tmp_path):
    """A label-only stage trains the image tower alone; the label heads never reach the checkpoint."""
    base = TrainConfig(seed=5, steps=6, batch_size=8, lr=2e-3, warmup_steps=2, threads=1, log_every=1,
                       distribution="natural", single_large=0.5, label_loss={"shape": 1.0})
    warmup = replace(base, contrastive_weight=0.0)
    torch.manual_seed(5)  # train() seeds with the first stage's seed before building the model
    initial = open_clip.model.CLIP(**TINY_CFG).state_dict()
    summary = train(Preset("tiny", TINY_CFG, warmup), out_dir=tmp_path / "warm", device="cpu", log=lambda _: None)
    assert all("label_shape" in e and "contrastive" not in e for e in summary["history"])
    warmed = load_file(str(tmp_path / "warm" / WEIGHTS_NAME))
    assert set(warmed) == set(initial)  # no label head in the checkpoint
    text = [k for k in initial if not k.startswith("visual.")]
    assert all(torch.equal(warmed[k], initial[k]) for k in text)
    assert not torch.equal(warmed["visual.conv1.weight"], initial["visual.conv1.weight"])

    staged = Preset("tiny", TINY_CFG, warmup, stages=[warmup, replace(base, seed=6)])
    summary = train(staged, out_dir=tmp_path / "staged", device="cpu", log=lambda _: None)
    assert [e["stage"] for e in summary["history"]][-1] == 1 and len(summary["stages"]) == 2
    assert summary["samples_seen"] == 2 * 6 * 8
    assert "contrastive" in summary["history"][-1]
    final = load_file(str(tmp_path / "staged" / WEIGHTS_NAME))
    assert not torch.equal(final["token_embedding.weight"], initial["token_embedding.weight"])
    loaded = load_model(config=tmp_path / "staged")
    assert loaded.info.layers == 2


TINY_HF_CFG = {"embed_dim": 16, "hf": {
    "model_type": "clip", "projection_dim": 16,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 64, "patch_size": 16, "hidden_act": "gelu"},
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "vocab_size": 49408, "max_position_embeddings": 32, "hidden_act": "gelu", "eos_token_id": 2}}}


def test_transformers_clip_starts_at_open_clip_init():
    """tower_init "open_clip" on a transformers CLIP vision tower: open_clip's ViT start (docs/towers.md)."""
    from sith.testbed.train import build_model, init_tower

    torch.manual_seed(0)
    model = build_model(TINY_HF_CFG)
    init_tower(model, "open_clip")
    emb = model.visual.embeddings
    assert emb.position_embedding.weight.std().item() == pytest.approx(32 ** -0.5, rel=0.2)
    bound = math.sqrt(6 / (32 + 3 * 32))
    for layer in model.visual.encoder.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert proj.weight.abs().max() <= bound and torch.count_nonzero(proj.bias) == 0
        assert torch.count_nonzero(layer.self_attn.out_proj.bias) == 0


@pytest.mark.slow
def test_short_run_of_a_transformers_clip_saves_a_transformers_folder(tmp_path):
    """A preset whose model_cfg holds a transformers config trains through HFModel and is written in
    transformers' own format: from_pretrained and sith's loader both read it."""
    import transformers

    from sith.engine.towers.hf import HFModel

    stages = [TrainConfig(seed=6, steps=4, batch_size=8, lr=2e-3, warmup_steps=1, threads=1, log_every=1,
                          distribution="natural", label_loss={"shape": 1.0}, tower_init="open_clip",
                          contrastive_weight=0.0),
              TrainConfig(seed=7, steps=4, batch_size=8, lr=2e-3, warmup_steps=1, threads=1, log_every=1,
                          distribution="natural", label_loss={"shape": 1.0})]
    summary = train(Preset("tiny-hf", TINY_HF_CFG, stages[0], stages=stages), out_dir=tmp_path, device="cpu",
                    log=lambda _: None)
    assert math.isfinite(summary["final_loss"]) and summary["samples_seen"] == 64
    assert {"config.json", "model.safetensors", "train.json"} <= {p.name for p in tmp_path.iterdir()}
    stock = transformers.CLIPModel.from_pretrained(str(tmp_path))
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded.model, HFModel) and loaded.info.layers == 2 and loaded.info.heads == 2
    for name, value in stock.state_dict().items():
        assert torch.equal(loaded.model.hf.state_dict()[name], value), name
