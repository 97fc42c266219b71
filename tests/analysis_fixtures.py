"""The tiny random CLIP the analysis and ground-truth tests explain, defined once.

ln_post's bias is randomised so the mean-centring and bias paths of the joint map are exercised
(a freshly initialised LayerNorm has bias 0)."""

from __future__ import annotations

import open_clip
import torch

from sith.engine.models import LoadedModel, vision_hash, vision_info

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def analysis_model(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CFG).eval().requires_grad_(False)
    with torch.no_grad():
        model.visual.ln_post.bias.normal_(0, 0.1)
    return LoadedModel(model=model, tokenizer=open_clip.get_tokenizer("ViT-B-32"), name="tiny",
                       hash=vision_hash(model), info=vision_info(model), preprocess=None)
