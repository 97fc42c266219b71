"""Small random open_clip CLIPs for the edit tests (fast, deterministic, non-trivial LN/bias)."""

from __future__ import annotations

import copy

import open_clip
import torch

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random LayerNorm affines and biases, so folding and bias compensation are really exercised
    (a fresh open_clip init has γ = 1, β = 0, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if name.endswith(("ln_1.weight", "ln_post.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("ln_1.bias", "in_proj_bias", "out_proj.bias", "ln_post.bias")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def tiny_clip(seed: int = 0) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**copy.deepcopy(TINY_CFG))
    return perturb(model, seed + 1).eval()


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


CONCEPTS = [
    "red", "blue", "green", "yellow", "water", "land", "snow", "forest", "circle", "square",
    "triangle", "star", "striped", "dotted", "small", "large", "boat", "bird", "tree", "house",
]


def tiny_loaded(tmp_path, seed: int = 0):
    """A perturbed tiny CLIP saved to disk and loaded back through the engine's loader."""
    import json

    from safetensors.torch import save_file

    from sith.engine.models import load_model

    model = tiny_clip(seed)
    config = tmp_path / f"tiny-{seed}.json"
    config.write_text(json.dumps(TINY_CFG))
    weights = tmp_path / f"tiny-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return load_model(config=config, checkpoint=weights)


def plan_inputs(loaded, dictionary, layers, k: int = 5):
    """Decomposition, joint space and candidate vectors built from the real engine pieces."""
    from sith.edits.plan import vector_set
    from sith.engine.decomposition import decompose
    from sith.engine.jointspace import DEFAULT_IMAGE_MEAN, JointSpace, resolve_image_mean
    from sith.engine.sparse import comp

    decomposition = decompose(loaded, layers)
    joint = JointSpace.for_model(loaded, resolve_image_mean(loaded, DEFAULT_IMAGE_MEAN))  # the Analyzer's default
    targets, codes = {}, {}
    for layer, svd in decomposition.items():
        heads, _, rank = svd.V.shape
        targets[layer] = joint.map(svd.V.transpose(1, 2).reshape(heads * rank, -1))
        codes[layer] = comp(targets[layer], dictionary.centred, k=k)
    return decomposition, joint, vector_set(decomposition, targets, codes, dictionary)
