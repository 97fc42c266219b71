"""Tiny timm architectures of each tower family, registered in timm's model registry.

open_clip builds timm towers by *name* only (``vision_cfg.timm_model_name``), so a small tower of
a family (for exactness tests, the coverage table and a second-family testbed model) needs a
registered name. These are the real timm classes (``VisionTransformer``, ``Eva``, ``FastVit``)
with the family's switches (MAP head, RoPE, separate q/k/v, the norm inside attention,
LayerScale, BatchNorm-read attention) at a few layers and a narrow width. Importing
``sith.engine.towers`` registers them, so an open_clip config naming one loads anywhere sith does.
"""

from __future__ import annotations

from functools import partial

from timm.layers import LayerNorm
from timm.models import register_model
from timm.models._registry import _model_entrypoints

TINY_MODELS = ("sith_tiny_vit_map", "sith_tiny_eva02", "sith_tiny_pe", "sith_tiny_fastvit", "sith_testbed_vit_map",
               "sith_testbed_vit")


def _named(kwargs: dict, name: str) -> dict:
    """A pretrained_cfg naming the architecture (no weights exist), so timm does not warn about it."""
    if not kwargs.get("pretrained_cfg"):
        kwargs["pretrained_cfg"] = {"architecture": name}
    return kwargs


def _register(fn):
    if fn.__name__ in _model_entrypoints:  # re-import (tests reload modules): keep the first
        return fn
    return register_model(fn)


@_register
def sith_tiny_vit_map(pretrained: bool = False, **kwargs):
    """SigLIP-style: fused qkv, no class token, MAP attention-pool head, LayerScale."""
    from timm.models.vision_transformer import _create_vision_transformer

    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0,
                class_token=False, global_pool="map", init_values=0.5)
    return _create_vision_transformer("sith_tiny_vit_map", pretrained=False, **dict(args, **_named(kwargs, "sith_tiny_vit_map")))


@_register
def sith_tiny_eva02(pretrained: bool = False, **kwargs):
    """EVA02-CLIP-style: separate q/k/v, RoPE, SwiGLU, LayerNorm inside attention (scale_attn_inner)."""
    from timm.models.eva import _create_eva

    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, qkv_fused=False,
                mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool=kwargs.pop("global_pool", "token"))
    return _create_eva("sith_tiny_eva02", pretrained=False, **dict(args, **_named(kwargs, "sith_tiny_eva02")))


@_register
def sith_tiny_pe(pretrained: bool = False, **kwargs):
    """PE-Core-style: fused-qkv RoPE attention, pre-transformer norm, MAP head."""
    from timm.models.eva import _create_eva

    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0,
                global_pool="map", attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True,
                ref_feat_shape=(4, 4), rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=4,
                attn_pool_mlp_ratio=2.0, norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_eva("sith_tiny_pe", pretrained=False, **dict(args, **_named(kwargs, "sith_tiny_pe")))


@_register
def sith_tiny_fastvit(pretrained: bool = False, **kwargs):
    """MobileCLIP MCi-style hybrid: RepMixer stages, attention (BatchNorm-read) in the last stage."""
    from timm.models.fastvit import RepConditionalPosEnc, _create_fastvit

    args = dict(layers=(1, 1, 1, 2), embed_dims=(8, 16, 32, 64), mlp_ratios=(2, 2, 2, 2),
                se_downsamples=(False, False, True, True),
                pos_embs=(None, None, None, partial(RepConditionalPosEnc, spatial_shape=(3, 3))),
                token_mixers=("repmixer", "repmixer", "repmixer", "attention"), lkc_use_act=True)
    return _create_fastvit("sith_tiny_fastvit", pretrained=False, **dict(args, **_named(kwargs, "sith_tiny_fastvit")))


@_register
def sith_testbed_vit_map(pretrained: bool = False, **kwargs):
    """The testbed's SigLIP-family tower (testbed-siglip): 64 px, 8 px patches, width 96, 5 blocks of
    4 heads, no class token, a MAP attention-pool head (docs/testbed.md)."""
    from timm.models.vision_transformer import _create_vision_transformer

    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=5, num_heads=4, mlp_ratio=2.0,
                class_token=False, global_pool="map")
    return _create_vision_transformer("sith_testbed_vit_map", pretrained=False, **dict(args, **_named(kwargs, "sith_testbed_vit_map")))


@_register
def sith_testbed_vit(pretrained: bool = False, **kwargs):
    """The testbed's timm class-token tower (testbed-timm): 64 px, 8 px patches, width 96, 5 blocks of
    4 heads, a class token, a LayerNorm before the blocks (timm's CLIP ViTs' ``pre_norm``), fused qkv
    (docs/testbed.md)."""
    from timm.models.vision_transformer import _create_vision_transformer

    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=5, num_heads=4, mlp_ratio=2.0,
                class_token=True, global_pool="token", pre_norm=True)
    return _create_vision_transformer("sith_testbed_vit", pretrained=False, **dict(args, **_named(kwargs, "sith_testbed_vit")))
