"""Ground truth for every singular vector of a testbed model: what each vector's activation encodes.

For a vector v_j of head h in layer l, the *activation* on an image is the head's write at the CLS
token projected on v_j: ``a_j = (Σ_t A_h[cls, t] (x̂_t W_V^h + c_h)) W_O^h · v_j`` (row form, the
same folded/centred factors as the decomposition, so the projection is exact). A factor's η² is
the one-way ANOVA ratio SS_between / SS_total of that activation grouped by the factor's value;
the vector's truth is the factor with the largest η² when η² >= ``ETA_THRESHOLD``, its +pole the
value with the most positive mean activation, its -pole the most negative.

Activations, labels and image embeddings of one (model, seed, n) are cached as safetensors under
``$SITH_DATA_DIR/ground_truth`` so re-running the harness costs only the coding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sith.engine.cache import data_dir
from sith.engine.decomposition import decompose_layer
from sith.testbed.factors import FACTORS
from sith.testbed.world import HELDOUT_SEED, NATURAL, make_batch, sample

ETA_THRESHOLD = 0.2
# Factors a vector's truth may be (group is a function of shape: its η² never exceeds shape's).
TRUTH_FACTORS: tuple[str, ...] = ("colour", "shape", "background", "texture", "size", "count", "position")
# Held-out world seeds this harness owns (evaluate.py uses HELDOUT_SEED .. +2).
VALIDATION_SEED = HELDOUT_SEED + 300
TEST_SEED = HELDOUT_SEED + 400


@dataclass
class WorldActivations:
    """Everything the harness needs from one image set."""

    labels: dict[str, Tensor]  # factor -> [N] long (position is -1 on multi-object images)
    activations: dict[int, Tensor]  # layer -> [N, H, r]: CLS write of head h projected on v_j
    embeddings: Tensor  # [N, D] unit image embeddings


def _head_cls_writes(block, x: Tensor, heads: int) -> Tensor:
    """[B, H, d]: each head's write at the CLS token (token 0) for the ln_1 output x [B, L, d]."""
    attn = block.attn
    d = attn.embed_dim
    dh = d // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(x[:, :1], w[:d], b[:d]).view(x.shape[0], 1, heads, dh)
    k = F.linear(x, w[d : 2 * d], b[d : 2 * d]).view(x.shape[0], -1, heads, dh)
    v = F.linear(x, w[2 * d :], b[2 * d :]).view(x.shape[0], -1, heads, dh)
    scores = torch.einsum("bqhe,bthe->bht", q, k) / dh**0.5
    pattern = scores.softmax(dim=-1)  # [B, H, L]
    mixed = torch.einsum("bht,bthe->bhe", pattern, v)  # [B, H, dh]
    w_out = attn.out_proj.weight.view(d, heads, dh)  # columns of head h
    gamma = getattr(getattr(block, "ls_1", None), "gamma", None)
    writes = torch.einsum("bhe,dhe->bhd", mixed, w_out)
    return writes * gamma if gamma is not None else writes


@torch.no_grad()
def collect(loaded, seed: int, n: int, batch_size: int = 100) -> WorldActivations:
    """Render n natural world images of ``seed`` and record every vector's activation."""
    model = loaded.model.eval()
    visual = model.visual
    blocks = visual.transformer.resblocks
    heads = loaded.info.heads
    basis = {layer: decompose_layer(block, heads, layer).V.float() for layer, block in enumerate(blocks)}
    captured: dict[int, Tensor] = {}

    def hook(layer: int):
        def grab(module, args, kwargs):
            captured[layer] = args[0] if args else kwargs["query"]
        return grab

    handles = [block.attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    labels: dict[str, list[Tensor]] = {}
    acts: dict[int, list[Tensor]] = {layer: [] for layer in basis}
    embeddings = []
    device = next(model.parameters()).device
    try:
        for start in range(0, n, batch_size):
            batch = make_batch([sample(NATURAL, seed, i) for i in range(start, min(n, start + batch_size))])
            embeddings.append(model.encode_image(batch.images.to(device), normalize=True).float().cpu())
            for factor, value in batch.labels.items():
                labels.setdefault(factor, []).append(value)
            for layer, block in enumerate(blocks):
                writes = _head_cls_writes(block, captured[layer], heads)  # [B, H, d]
                acts[layer].append(torch.einsum("bhd,hdr->bhr", writes.float(), basis[layer].to(writes.device)).cpu())
    finally:
        for handle in handles:
            handle.remove()
    return WorldActivations(
        labels={f: torch.cat(v) for f, v in labels.items()},
        activations={layer: torch.cat(v) for layer, v in acts.items()},
        embeddings=torch.cat(embeddings),
    )


def cached_collect(loaded, seed: int, n: int) -> WorldActivations:
    """``collect`` memoised on disk by (vision hash, seed, n)."""
    from safetensors.torch import load_file, save_file

    folder = data_dir() / "ground_truth"
    key = hashlib.sha256(f"{loaded.hash}/{seed}/{n}/v1".encode()).hexdigest()[:20]
    path = Path(folder) / f"{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return WorldActivations(
            labels={k[6:]: v for k, v in t.items() if k.startswith("label.")},
            activations={int(k[4:]): v for k, v in t.items() if k.startswith("act.")},
            embeddings=t["embeddings"],
        )
    data = collect(loaded, seed, n)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"embeddings": data.embeddings.contiguous()}
    tensors.update({f"label.{k}": v.contiguous() for k, v in data.labels.items()})
    tensors.update({f"act.{k}": v.contiguous() for k, v in data.activations.items()})
    save_file(tensors, str(path))
    return data


def eta_squared(activations: Tensor, labels: Tensor, num_values: int) -> Tensor:
    """One-way ANOVA η² = SS_between / SS_total of each column of activations [N, V] grouped by labels [N].

    Rows with a negative label (undefined value, e.g. position on multi-object images) are skipped.
    A constant column has η² = 0.
    """
    keep = labels >= 0
    a = activations[keep].double()
    y = labels[keep]
    onehot = F.one_hot(y, num_values).double()  # [N, G]
    counts = onehot.sum(0)  # [G]
    grand = a.mean(0, keepdim=True)
    centred = a - grand
    total = centred.square().sum(0)
    group_means = (onehot.T @ centred) / counts.clamp_min(1)[:, None]  # [G, V] (deviations from grand)
    between = (counts[:, None] * group_means.square()).sum(0)
    return torch.where(total > 0, between / total.clamp_min(1e-300), torch.zeros_like(total)).float()


@dataclass
class Truth:
    """Per vector (rows of the activation matrix): η² per factor, truth factor, pole values."""

    eta: dict[str, Tensor]  # factor -> [V]
    factor: list[str | None]  # argmax factor when its η² >= threshold, else None
    positive: list[str | None]  # +pole value of the truth factor
    negative: list[str | None]  # -pole value

    @property
    def carrying(self) -> list[int]:
        return [i for i, f in enumerate(self.factor) if f is not None]


def ground_truth(activations: Tensor, labels: dict[str, Tensor], threshold: float = ETA_THRESHOLD) -> Truth:
    """Truth of every column of activations [N, V] (module docstring)."""
    eta = {f: eta_squared(activations, labels[f], len(FACTORS[f])) for f in TRUTH_FACTORS}
    stacked = torch.stack([eta[f] for f in TRUTH_FACTORS])  # [F, V]
    best, which = stacked.max(0)
    factors, positive, negative = [], [], []
    for v in range(activations.shape[1]):
        if float(best[v]) < threshold:
            factors.append(None)
            positive.append(None)
            negative.append(None)
            continue
        factor = TRUTH_FACTORS[int(which[v])]
        y = labels[factor]
        keep = y >= 0
        means = torch.stack([activations[keep & (y == g), v].double().mean() if bool((keep & (y == g)).any())
                             else torch.tensor(float("nan"), dtype=torch.float64)
                             for g in range(len(FACTORS[factor]))])
        values = FACTORS[factor]
        factors.append(factor)
        positive.append(values[int(torch.nan_to_num(means, nan=-float("inf")).argmax())])
        negative.append(values[int(torch.nan_to_num(means, nan=float("inf")).argmin())])
    return Truth(eta=eta, factor=factors, positive=positive, negative=negative)
