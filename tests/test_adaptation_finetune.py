"""LoRA wrapper and the sub-task fine-tuning loop (tiny models, a few steps)."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from sith.adaptation.finetune import FinetuneConfig, add_lora, finetune, merge_lora
from sith.engine.errors import InvalidInput

CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**copy.deepcopy(CFG)).eval()


def test_lora_is_identity_at_init_then_merges_into_low_rank_stock_weights():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = add_lora(model, rank=2, alpha=4.0)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model.encode_image(x), _model().encode_image(x), atol=1e-6)  # B = 0
    with torch.no_grad():
        for p in params:
            p.normal_()
    merge_lora(model)
    after = model.state_dict()
    assert set(after) == set(before)  # plain open_clip layout again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"visual.transformer.resblocks.{i}.attn.{n}" for i in range(2)
                       for n in ("in_proj_weight", "out_proj.weight")}
    for name in changed:
        assert torch.linalg.matrix_rank(after[name] - before[name]) <= 2
    fresh = _model()
    fresh.load_state_dict(after)  # loads into a stock model, strictly


def test_bad_lora_layers_and_mode():
    with pytest.raises(InvalidInput) as info:
        add_lora(_model(), rank=2, alpha=1.0, layers=[5])
    assert info.value.field == "lora_layers"
    with pytest.raises(InvalidInput) as info:
        finetune(_model(), CFG, FinetuneConfig(mode="adapter", steps=1))
    assert info.value.field == "mode"
    with pytest.raises(InvalidInput) as info:
        finetune(_model(), CFG, FinetuneConfig(subtask="everything", steps=1))
    assert info.value.field == "subtask"


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_changes_only_the_vision_tower(mode, tmp_path):
    base = _model()
    cfg = FinetuneConfig(mode=mode, steps=2, batch_size=4, lr=1e-2, log_every=1)
    tuned, summary = finetune(base, CFG, cfg, out_dir=tmp_path, log=lambda _: None)
    b, t = base.state_dict(), tuned.state_dict()
    assert set(b) == set(t)
    changed = {k for k in b if not torch.equal(b[k], t[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    if mode == "lora":
        assert all(k.endswith(("in_proj_weight", "out_proj.weight")) for k in changed)
    assert (tmp_path / "open_clip_model.safetensors").is_file() and (tmp_path / "finetune.json").is_file()
    assert len(summary["history"]) == 2


def test_colour_subtask_stream_is_filtered_and_deterministic():
    from sith.adaptation.finetune import SUBTASKS, WARM, SubtaskStream

    stream = SubtaskStream(SUBTASKS["warm-colours"], seed=3, batch_size=6, steps=2)
    first = stream[1]
    assert len(first.captions) == 6 and all(s.colour in WARM for s in first.scenes)
    assert first.captions == stream[1].captions and first.captions != stream[0].captions
    group = SubtaskStream(SUBTASKS["round-only"], seed=3, batch_size=6, steps=1)[0]
    assert all(s.shape in ("circle", "oval", "ring", "heart", "moon") for s in group.scenes)


def test_renamed_colour_word_replaces_whole_words_only():
    from sith.adaptation.finetune import SUBTASKS, SubtaskStream

    subtask = SUBTASKS["crimson"]
    assert subtask.caption("a red star, not a reddish one; red") == "a crimson star, not a reddish one; crimson"
    batch = SubtaskStream(subtask, seed=0, batch_size=16, steps=1)[0]
    reds = [c for c, s in zip(batch.captions, batch.scenes) if s.colour == "red"]
    assert reds and not any(" red " in f" {c} " for c in batch.captions)


def test_swap_exchanges_two_words_at_once():
    from sith.adaptation.finetune import SUBTASKS, SubtaskStream

    swap = SUBTASKS["swap-red-blue"]
    assert swap.caption("a red star and a blue ring, bluer than red.") == "a blue star and a red ring, bluer than blue."
    batch = SubtaskStream(swap, seed=1, batch_size=64, steps=1)[0]
    words = lambda colour: [set(t.replace(",", " ").replace(".", " ").split())  # noqa: E731
                            for t, s in zip(batch.captions, batch.scenes) if s.colour == colour]
    assert not any("red" in w for w in words("red")) and any("blue" in w for w in words("red"))
    assert not any("blue" in w for w in words("blue")) and any("red" in w for w in words("blue"))


def test_cli_finetune_writes_a_stock_checkpoint(tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from sith.cli import main
    from sith.engine.models import load_model

    base = tmp_path / "base"
    base.mkdir()
    (base / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG}))
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(base / "open_clip_model.safetensors"))
    result = CliRunner().invoke(main, ["adapt", "finetune", str(base), str(tmp_path / "out"), "--mode", "lora",
                                       "--steps", "1", "--batch-size", "4", "--subtask", "crimson"])
    assert result.exit_code == 0, result.output
    before, after = load_model(str(base)), load_model(str(tmp_path / "out"))
    assert before.hash != after.hash and before.info == after.info
    bad = CliRunner().invoke(main, ["adapt", "finetune", str(base), str(tmp_path / "x"), "--subtask", "nope"])
    assert bad.exit_code == 2 and "subtask" in bad.output
