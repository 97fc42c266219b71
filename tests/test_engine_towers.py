"""Tower adapters: exactness per family on tiny random-init models.

For every family (open_clip ViT with LayerScale, CoCa's attentional pooler, CLIPA pooling, a
SigLIP-style timm ViT with a MAP head, EVA02 with the norm inside attention, PE-Core, a MobileCLIP
FastViT hybrid, transformers CLIP and SigLIP):

* the per-head SVD equals the dense map *probed through the stock attention module* (constant
  token sequences: attention weights sum to one, so the module returns its value/output map);
* α = 1 leaves every weight and the image embedding unchanged;
* an edited model exported by sith loads in the family's own stock loader (open_clip
  ``create_model('local-dir:')`` or transformers ``from_pretrained``) and its image embeddings equal
  the original model run with an independent patch: a pre-hook on the output projection that maps
  the head's values through R = pinv(A) U diag(ασ) Vᵀ pinv(B) (value side, not weights);
* loading through ``load_model`` (folder), decomposition and the data-free image mean work.
"""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from torch import nn

from sith.edits.apply import apply_multipliers
from sith.edits.export import export_model
from sith.edits.multipliers import Multipliers
from sith.engine.decomposition import decompose, decompose_layer
from sith.engine.errors import InvalidInput
from sith.engine.jointspace import JointSpace, resolve_image_mean
from sith.engine.models import load_model
from sith.engine.towers import adapter_for
from sith.engine.towers.hf import HF_TYPES, HFModel, LazyTokenizer, build_hf

torch.set_num_threads(1)

TEXT = {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
VIT = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16}


def _cfg(vision: dict, embed_dim: int = 24, **extra) -> dict:
    text = {**TEXT, "embed_cls": True, "output_tokens": True} if "multimodal_cfg" in extra else TEXT
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text, **extra}


OPEN_CLIP = {
    "openclip-ls": _cfg({**VIT, "ls_init_value": 0.5}),
    "coca": _cfg({**VIT, "attentional_pool": True, "attn_pooler_heads": 4, "output_tokens": True},
                 multimodal_cfg={"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
                 custom_text=True),  # (text_cfg gets CoCa's embed_cls/output_tokens in _cfg)
    "clipa": _cfg({**VIT, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True}),
    "siglip-timm": _cfg({"image_size": 32, "timm_model_name": "sith_tiny_vit_map", "timm_pool": "map",
                         "timm_proj": "none"}, embed_dim=64, custom_text=True),
    "eva02": _cfg({"image_size": 32, "timm_model_name": "sith_tiny_eva02", "timm_pool": "token",
                   "timm_proj": None}, custom_text=True),
    "pe-core": _cfg({"image_size": 32, "timm_model_name": "sith_tiny_pe", "timm_pool": "map",
                     "timm_proj": None}, custom_text=True),
    "fastvit": _cfg({"image_size": 64, "timm_model_name": "sith_tiny_fastvit", "timm_pool": "avg",
                     "timm_proj": None}, custom_text=True),
}
HF_SIGLIP_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "vocab_size": 1000, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2,
                  "pad_token_id": 0}
HF_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "patch_size": 8}
HF = {
    "hf-clip": {"model_type": "clip", "projection_dim": 16,
                "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "vocab_size": 49408, "max_position_embeddings": 16},
                "vision_config": {**HF_VISION, "image_size": 32}},
    "hf-siglip": {"model_type": "siglip", "text_config": HF_SIGLIP_TEXT,
                  "vision_config": {**HF_VISION, "image_size": 32}},
    "hf-siglip2": {"model_type": "siglip2", "text_config": HF_SIGLIP_TEXT,   # NaFlex: 4×4 patches of 8 px
                   "vision_config": {**HF_VISION, "num_patches": 16}},
}
FAMILIES = [*OPEN_CLIP, *HF]


def _randomise(model: nn.Module, seed: int) -> None:
    """Non-trivial norms, biases and LayerScales so every fold and compensation is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():  # O(1) head writes (timm's EVA init makes them ~1e-3)
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.in_features ** 0.5)
        for name, p in model.named_parameters():
            if p.ndim >= 2 and (not torch.isfinite(p).all() or p.abs().max() > 1e6):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[0] ** 0.5)  # CoCa leaves some uninitialised
            if name.endswith("gamma"):  # LayerScale (FastViT's LayerScale2d is [C, 1, 1])
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.ndim == 1 and ("norm" in name or "ln_" in name or name.endswith("gamma") or ".ls" in name
                                or "layer_scale" in name or "layernorm" in name):
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                else:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.ndim == 1 and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, buf in model.named_buffers():  # BatchNorm running statistics
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.2)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family in HF:
        model = build_hf(copy.deepcopy(HF[family]))
    else:
        cfg = copy.deepcopy(OPEN_CLIP[family])
        custom = cfg.pop("custom_text", False)
        cls = (open_clip.coca_model.CoCa if "multimodal_cfg" in cfg
               else open_clip.model.CustomTextCLIP if custom else open_clip.model.CLIP)
        model = cls(**cfg)
    _randomise(model, seed)
    return model.eval().requires_grad_(False)


def images(model: nn.Module, n: int = 3) -> torch.Tensor:
    size = adapter_for(model).image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


# ------------------------------------------------------------------------------------ stock probes

def _stock_attention(block: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The block's own attention module (plus its LayerScale) on a batch of token sequences y [N, T, d]."""
    if isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
        out = block.attn(y, y, y, need_weights=False)[0]
        return block.ls_1(out)
    if hasattr(block, "token_mixer"):  # FastViT: NCHW, LayerScale2d
        n, t, d = y.shape
        out = block.token_mixer(y.transpose(1, 2).reshape(n, d, 1, t))
        return block.layer_scale_1(out).reshape(n, d, t).transpose(1, 2)
    if hasattr(block, "self_attn"):  # transformers
        return block.self_attn(hidden_states=y)[0]
    out = block.attn(y)
    return block.ls1(out) if hasattr(block, "ls1") else out


def probe_dense(model: nn.Module, layer: int, head: int) -> torch.Tensor:
    """Head ``head``'s folded (centred where the stream is LayerNorm-read) VO map [d, d], probed
    through the stock modules: constant sequences, other heads zeroed at the output projection."""
    tower = adapter_for(model)
    access = tower.access(layer)
    d, dh = tower.width, tower.head_dim
    cols = slice(head * dh, (head + 1) * dh)
    block = copy.deepcopy(tower.blocks[layer])  # a copy whose output projection sees only this head
    out = adapter_for(model).access(layer).out
    index = [name for name, m in tower.blocks[layer].named_modules() if m is out][0]
    with torch.no_grad():
        keep = torch.zeros(out.weight.shape[1])
        keep[cols] = 1
        block.get_submodule(index).weight.mul_(keep)
    handles = []
    inner = getattr(getattr(block, "attn", None), "norm", None)
    if isinstance(inner, nn.LayerNorm):  # EVA02 convention: the inner norm counts as its affine γ only
        handles.append(inner.register_forward_hook(lambda m, args, out: args[0] * m.weight))
    try:
        if hasattr(block, "token_mixer"):  # BatchNorm reader: raw stream coordinates, no centring
            basis = torch.eye(d)
            bn = block.norm
            feed = lambda x: bn(x[:, :, None, None])[:, :, 0, 0]  # noqa: E731
        else:
            norm = block.ln_1 if hasattr(block, "ln_1") else block.norm1 if hasattr(block, "norm1") \
                else block.layer_norm1
            basis = torch.eye(d) - 1.0 / d  # zero-mean rows: the standardised input space
            feed = lambda x: x * norm.weight + norm.bias  # noqa: E731
        with torch.no_grad():
            y = feed(torch.cat([basis, torch.zeros(1, d)]))[:, None, :].expand(-1, 2, -1)
            out = _stock_attention(block, y)[:, 0, :].double()
        dense = out[:-1] - out[-1:]
        if access.centre:
            dense = dense - dense.mean(dim=1, keepdim=True)
        return dense
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ exactness

def test_svd_matches_the_stock_module_probe(family):
    model = build(family)
    tower = adapter_for(model)
    layer = tower.num_layers - 1
    svd = decompose_layer(tower.blocks[layer], tower.num_heads, layer)
    for head in range(tower.num_heads):
        dense = probe_dense(model, layer, head)
        sigma = torch.linalg.svdvals(dense)[: tower.head_dim]
        torch.testing.assert_close(svd.S[head].double(), sigma, rtol=1e-4, atol=1e-5 * float(sigma[0]))
        rebuilt = svd.U[head].double() @ torch.diag(svd.S[head].double()) @ svd.V[head].double().T
        torch.testing.assert_close(rebuilt, dense, rtol=0, atol=1e-4 * float(sigma[0]))
    assert (svd.S[:, :-1] >= svd.S[:, 1:] - 1e-6).all()


def test_alpha_one_is_the_identity(family):
    model = build(family)
    tower = adapter_for(model)
    layers = [tower.num_layers - 1, 0]
    dec = {layer: decompose_layer(tower.blocks[layer], tower.num_heads, layer) for layer in layers}
    ones = Multipliers({layer: torch.ones_like(svd.S) for layer, svd in dec.items()})
    same = apply_multipliers(model, ones, dec, skip_unchanged=False)
    before, after = model.state_dict(), same.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=2e-6, msg=name)
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(same.encode_image(x), model.encode_image(x), rtol=0, atol=1e-5)


def _patched_reference(model: nn.Module, layer: int, alpha: torch.Tensor, svd) -> list:
    """Pre-hooks on the original model's output projection applying the edit on the VALUE side:
    u_h -> (u_h - c_h) R_h + c_h with R_h = pinv(A_h) U diag(α σ) Vᵀ pinv(B_h) (in units of the
    inner norm's γ where there is one). Returns the hook handles."""
    tower = adapter_for(model)
    access = tower.access(layer)
    w_v, w_o = tower.vo_factors(layer)
    const = tower.head_value_bias(layer).double()
    dh = tower.head_dim
    inner = access.inner_scale()
    maps = {}
    for head in range(tower.num_heads):
        if bool((alpha[head] == 1).all()):
            continue
        target = svd.U[head].double() @ torch.diag(alpha[head].double() * svd.S[head].double()) @ svd.V[head].double().T
        maps[head] = torch.linalg.pinv(w_v[head].double()) @ target @ torch.linalg.pinv(w_o[head].double())

    block = tower.blocks[layer]
    if isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
        # nn.MultiheadAttention never calls out_proj as a module: patch the value rows instead,
        # W_v' = Rᵀ W_v and b_v' = b_v + (W_v − W_v')β₁ (the constant c_h stays), which is the same map
        attn, beta = block.attn, block.ln_1.bias.double()
        d = tower.width
        saved = (attn.in_proj_weight.detach().clone(), attn.in_proj_bias.detach().clone())
        with torch.no_grad():
            for head, r in maps.items():
                rows = slice(2 * d + head * dh, 2 * d + (head + 1) * dh)
                w_v = attn.in_proj_weight[rows].double()
                new = r.T @ w_v
                attn.in_proj_bias[rows] += ((w_v - new) @ beta).to(attn.in_proj_bias.dtype)
                attn.in_proj_weight[rows] = new.to(attn.in_proj_weight.dtype)

        class Restore:
            def remove(self) -> None:
                with torch.no_grad():
                    attn.in_proj_weight.copy_(saved[0])
                    attn.in_proj_bias.copy_(saved[1])
        return [Restore()]

    def patch(_module, args):
        x = args[0].double().clone()
        for head, r in maps.items():
            cols = slice(head * dh, (head + 1) * dh)
            g = inner[cols].double() if inner is not None else torch.ones(dh, dtype=torch.float64)
            u = x[..., cols] / g
            x[..., cols] = ((u - const[head]) @ r + const[head]) * g
        return (x.to(args[0].dtype),)

    return [access.out.register_forward_pre_hook(patch)]


def _stock_load(family: str, folder) -> nn.Module:
    if family in HF:
        import transformers

        cls = getattr(transformers, HF_TYPES[HF[family]["model_type"]])
        return HFModel(cls.from_pretrained(str(folder)).eval())
    return open_clip.create_model(f"local-dir:{folder}").eval()


def test_edited_export_loads_in_the_stock_loader_and_matches_a_patched_forward(family, tmp_path):
    model = build(family)
    tower = adapter_for(model)
    layer = tower.num_layers - 1
    svd = decompose_layer(tower.blocks[layer], tower.num_heads, layer)
    alpha = torch.ones_like(svd.S)
    alpha[0, 0], alpha[0, 1] = 0.0, 2.5
    alpha[1] = torch.linspace(-1.0, 1.5, alpha.shape[1])
    edited = apply_multipliers(model, Multipliers({layer: alpha}), {layer: svd})
    cfg = None if family in HF else {k: v for k, v in OPEN_CLIP[family].items()}
    out = export_model(edited, tmp_path / "edited", {"test": family}, model_cfg=cfg)
    stock = _stock_load(family, out)
    x = images(model)
    handles = _patched_reference(model, layer, alpha, svd)
    try:
        with torch.no_grad():
            expected = model.encode_image(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = stock.encode_image(x)
        base = model.encode_image(x)
    scale = float(expected.abs().max())
    assert float((base - expected).abs().max()) > 1e-3 * scale  # the edit is visible
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * scale)


def test_loader_decompose_and_data_free_mean(family, tmp_path):
    model = build(family)
    if family in HF:
        folder = model.sith_export(tmp_path / "m", {})
    else:
        folder = export_model(model, tmp_path / "m", {}, model_cfg=OPEN_CLIP[family])
    loaded = load_model(str(folder))
    tower = adapter_for(loaded.model)
    assert loaded.info.layers == tower.num_layers and loaded.info.heads == tower.num_heads
    dec = decompose(loaded, [-1])
    assert set(dec) == {tower.num_layers - 1}
    mean = resolve_image_mean(loaded, "poles")
    assert mean.shape == (loaded.info.output_dim,) and torch.isfinite(mean).all()
    space = JointSpace.for_model(loaded, mean)
    v = dec[tower.num_layers - 1].V[0].T
    mapped = space.map(v)
    assert mapped.shape == (v.shape[0], loaded.info.output_dim)
    torch.testing.assert_close(mapped.norm(dim=1), torch.ones(v.shape[0]))
    assert space.pullback.shape == (tower.width, loaded.info.output_dim)
    if family == "fastvit":  # non-linear final conv: linearised at v = 0
        step = 1e-3 * torch.randn(1, tower.width, dtype=torch.float64)
        readout = space.ln_post
        with torch.no_grad():
            moved = (readout(step.float()) - readout(torch.zeros(1, tower.width))).double()
        torch.testing.assert_close(moved, step @ space.pullback.double(), rtol=0, atol=1e-3 * float(moved.abs().max()))
    if family == "openclip-ls":
        visual = loaded.model.visual
        torch.testing.assert_close(space.pullback, visual.ln_post.weight[:, None] * visual.proj)
    assert loaded.hash == load_model(str(folder)).hash


# ------------------------------------------------------------------------------------ joint map

@pytest.mark.parametrize("family", ["openclip-ls", "coca", "siglip-timm", "hf-clip", "hf-siglip2"])
def test_joint_readout_is_the_towers_own_head_on_a_constant_sequence(family):
    """The data-free readout of v equals the tower's pooled embedding when every token is v."""
    model = build(family)
    tower = adapter_for(model)
    readout, proj, _ = tower.joint_pieces()
    v = torch.randn(4, tower.width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = readout(v)
        z = z @ proj if proj is not None else z
        tokens = v[:, None, :].expand(-1, 5, -1)
        if family == "hf-clip":
            ref = model.hf.visual_projection(model.hf.vision_model.post_layernorm(tokens[:, 0]))
        elif family == "siglip-timm":
            trunk = model.visual.trunk
            ref = model.visual.head(trunk.forward_head(trunk.norm(tokens)))
        elif family == "hf-siglip2":            # the stock MAP head over post_layernorm'd tokens
            vision = model.hf.vision_model
            ref = vision.head(vision.post_layernorm(tokens))
        else:
            pooled, _ = model.visual._pool(tokens)
            ref = pooled @ model.visual.proj
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)


def test_set_projection_writes_the_final_linear():
    for family in ("openclip-ls", "hf-clip"):
        tower = adapter_for(build(family))
        proj = tower.joint_pieces()[1].clone()
        tower.set_projection(proj * 2)
        torch.testing.assert_close(tower.joint_pieces()[1], proj * 2)
        with pytest.raises(InvalidInput):
            tower.set_projection(torch.zeros(3, 3))
    eva = build("eva02")
    new = torch.randn(64, 24)
    adapter_for(eva).set_projection(new)
    torch.testing.assert_close(eva.visual.trunk.head.weight, new.T)
    with pytest.raises(InvalidInput, match="no final linear projection"):
        adapter_for(build("siglip-timm")).set_projection(torch.zeros(64, 64))


# ------------------------------------------------------------------------------------ errors, laziness

@pytest.mark.parametrize(("vision", "fragment"), [
    ({"image_size": 32, "timm_model_name": "test_convnext", "timm_pool": "avg", "timm_proj": "linear"},
     "timm ConvNeXt"),
    ({"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}, "ModifiedResNet"),
])
def test_unsupported_towers_are_named(tmp_path, vision, fragment):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_cfg(vision)))
    with pytest.raises(InvalidInput) as err:
        load_model(config=path)
    assert err.value.field == "config"
    assert fragment in err.value.reason


def test_tokenizer_is_built_only_when_text_is_encoded(tmp_path):
    """CLIPA-style configs name a HF tokenizer; decompose must not build it (no transformers/network needed)."""
    cfg = _cfg({**VIT, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True})
    cfg["text_cfg"] = {**TEXT, "hf_tokenizer_name": "sith-test/not-a-real-tokenizer"}
    folder = export_model(build("clipa"), tmp_path / "clipa", {}, model_cfg=cfg)
    loaded = load_model(str(folder))
    decompose(loaded, [-1])
    assert loaded.tokenizer._tokenizer is None
    assert isinstance(loaded.tokenizer, LazyTokenizer)  # looked up (here: would fail) on first text only


@pytest.mark.parametrize("family", ["openclip-ls", "eva02", "fastvit", "hf-siglip", "hf-siglip2"])
def test_mlp_output_round_trips(family):
    """The MLP's folded write matrix reads back what was written (LayerScale unfolded, mean restored)."""
    model = build(family)
    tower = adapter_for(model)
    layer = tower.num_layers - 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = tower.mlp_output(layer)
    tower.write_mlp_output(layer, w)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=2e-6, msg=name)
    changed = w * torch.linspace(0.0, 2.0, w.shape[0])[:, None]
    tower.write_mlp_output(layer, changed)
    torch.testing.assert_close(tower.mlp_output(layer), changed, rtol=0, atol=1e-5)
    with pytest.raises(InvalidInput):
        tower.write_mlp_output(layer, w[:, :3])


def test_lora_goes_through_the_adapter_and_merges_into_stock_weights(family):
    """`sith adapt finetune --mode lora` on every family: LoRA sits on the attention's q/k/v (fused or
    separate) and output weights the adapter names; B = 0 is the identity; after merging, only those
    weights changed, each by rank ≤ r, and the state dict keeps the stock keys."""
    from sith.adaptation.finetune import add_lora, merge_lora

    model = build(family)
    x = images(model)
    reference = model.encode_image(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = add_lora(model, rank=2, alpha=4.0)
    tower = adapter_for(model)
    assert len(params) == 2 * sum(len(tower.access(i).attention_weights()) for i in range(tower.num_layers))
    torch.testing.assert_close(model.encode_image(x), reference, rtol=0, atol=1e-6)
    with torch.no_grad():
        for p in params:
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    edited = model.encode_image(x)
    merge_lora(model)
    after = model.state_dict()
    assert set(after) == set(before)
    torch.testing.assert_close(model.encode_image(x), edited, rtol=1e-5, atol=1e-5)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = {id(getattr(m, n)) for i in range(tower.num_layers) for m, n in tower.access(i).attention_weights()}
    assert changed and {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in targets} == changed
    for name in changed:
        assert torch.linalg.matrix_rank(after[name] - before[name]) <= 2


@pytest.mark.parametrize("height,width", [(16, 64), (24, 40), (40, 24)])
def test_siglip2_non_square_batches_match_the_stock_processor(height, width):
    """NaFlex with other aspect ratios: a [B, 3, H, W] batch is patchified on its own (H/p, W/p) grid and
    embeds exactly as transformers' Siglip2ImageProcessor (which pads to max_num_patches and masks)
    followed by the model's own get_image_features."""
    from transformers import Siglip2ImageProcessor

    model = build("hf-siglip2")
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=16, do_rescale=False, do_normalize=False)
    inputs = processor(images=[x[0].numpy().transpose(1, 2, 0)], return_tensors="pt", input_data_format="channels_last")
    assert inputs["spatial_shapes"].tolist() == [[height // 8, width // 8]]  # no resize: the grid is the image's
    reference = model.hf.get_image_features(**inputs)
    reference = reference if isinstance(reference, torch.Tensor) else reference.pooler_output
    torch.testing.assert_close(model.encode_image(x), reference, rtol=0, atol=1e-5)


def test_fastvit_mlp_write_is_its_1x1_conv_per_position():
    """FastViT's ConvMlp writes through a 1×1 conv (fc2) and LayerScale2d: writing folded rows W T must
    turn the block's MLP contribution y (bias part excluded) into y T at every position, measured on the
    stock module's own forward."""
    model = build("fastvit")
    tower = adapter_for(model)
    layer = tower.num_layers - 1
    block = tower.blocks[layer]
    x = torch.randn(2, block.mlp.fc2.out_channels, 4, 4, generator=torch.Generator().manual_seed(3))

    def contribution() -> torch.Tensor:  # [B·H·W, d]: layer_scale_2(mlp(x)) minus the bias part
        y = block.layer_scale_2(block.mlp(x)) - block.layer_scale_2(block.mlp.fc2.bias[None, :, None, None])
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])

    before = contribution()
    w = tower.mlp_output(layer)
    t = torch.eye(w.shape[1]) + 0.3 * torch.randn(w.shape[1], w.shape[1], generator=torch.Generator().manual_seed(4))
    tower.write_mlp_output(layer, w @ t)
    torch.testing.assert_close(contribution(), before @ t, rtol=1e-4, atol=1e-5)
