"""Residual-stream directions -> the joint image-text space, and the approximate way back (spec §1.7–1.8).

A write direction v is read out the way the CLS token is: ``z = LN_post(v) @ P`` with the *full*
ln_post (its bias β_p adds the same offset β_p P to every direction; the authors include it), then
normalised, then centred by an image mean μ and normalised again, because the text dictionary is
centred by its own mean too and both modalities must meet around the origin (modality gap).

The paper's μ is the mean normalised image embedding over CC12M, which needs data. The data-free
default, ``image_mean="poles"``, uses instead the mean of the normalised mapped right singular
vectors of **all heads of all layers** of the tower, each taken with **both signs** (±v). Why:
every mapped direction shares the ln_post offset β_p P and the tower's common output bias, which is
exactly the shared component the image mean removes; averaging over the whole tower makes μ a
property of the model alone (codes for layer 20 do not change when layer 21 is also requested),
and averaging both poles makes it independent of the SVD's arbitrary sign rule. On the testbed it
is closer to the real image mean than the one-sign "directions" mean (cosine 0.90 vs 0.83), which
under the other sign convention has cosine only 0.59 to itself (docs/explanations.md). Users with
images can pass a folder (or a precomputed tensor) to get the paper's convention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sith.engine.decomposition import decompose_layer
from sith.engine.memo import layer_svd
from sith.engine.errors import InvalidInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TENSOR_SUFFIXES = {".pt", ".pth", ".npy", ".safetensors"}


class JointSpace:
    """Maps d-dim residual directions to unit, centred joint-space vectors and back."""

    def __init__(self, ln_post: nn.Module, proj: Tensor | None, image_mean: Tensor | None,
                 linear: Tensor | None = None, pullback: Tensor | None = None) -> None:
        """``ln_post``: the readout before the final projection (a LayerNorm, or a tower adapter's
        ``Readout``); ``proj``: the final projection [D', D] or None; ``linear``: the linear map
        [d, D] whose pseudo-inverse the approximate inverse uses (default ``proj``); ``pullback``:
        the readout's linear part with its norms' gains [d, D] (default diag(γ_post) P), through
        which text directions are pulled back into the residual stream (edits)."""
        self.ln_post = ln_post
        self.proj = proj.detach() if proj is not None else None
        self.linear = linear.detach() if linear is not None else self.proj
        if pullback is None and isinstance(ln_post, nn.LayerNorm) and self.proj is not None \
                and ln_post.weight is not None and ln_post.weight.shape[0] == self.proj.shape[0]:
            pullback = ln_post.weight.detach()[:, None] * self.proj
        self.pullback = pullback.detach() if pullback is not None else None
        self.image_mean = image_mean.detach().float() if image_mean is not None else None
        self._pinv: Tensor | None = None

    @classmethod
    def for_model(cls, loaded, image_mean: Tensor | None) -> JointSpace:
        """The model's data-free readout, from its tower adapter (``sith.engine.towers``)."""
        from sith.engine.towers import adapter_for

        tower = adapter_for(loaded.model)
        readout, proj, linear = tower.joint_pieces()
        return cls(readout, proj, image_mean, linear, tower.pullback_matrix())

    def project(self, vectors: Tensor) -> Tensor:
        """Unit ``LN_post(v) @ P`` [B, D], before centring."""
        with torch.no_grad():
            z = self.ln_post(vectors.to(self.ln_post.weight.dtype))
            if self.proj is not None:
                z = z @ self.proj
        return F.normalize(z, dim=-1)

    def map(self, vectors: Tensor) -> Tensor:
        """[B, d] -> [B, D]: unit, centred by the image mean (when set), unit again."""
        z = self.project(vectors)
        if self.image_mean is None:
            return z
        return F.normalize(z - self.image_mean.to(z.device), dim=-1)

    def pinv(self) -> Tensor:
        if self._pinv is None:
            self._pinv = torch.linalg.pinv(self.linear.double()).float() if self.linear is not None else None
        return self._pinv

    def inverse(self, joint: Tensor) -> Tensor:
        """Spec §1.8 (the authors' fidelity metric): un-centre, apply pinv(P), normalise. [B, D] -> [B, d].

        ln_post is not inverted, so this is approximate by design.
        """
        y = F.normalize(joint.float(), dim=-1)
        if self.image_mean is not None:
            y = F.normalize(y + self.image_mean.to(y.device), dim=-1)
        pinv = self.pinv()
        if pinv is not None:
            y = y @ pinv.to(y.device)
        elif not isinstance(self.ln_post, nn.LayerNorm):
            raise InvalidInput("fidelity", "this tower's readout has no linear part to invert "
                               "(see docs/towers.md); fidelity is not available for it")
        return F.normalize(y, dim=-1)


def _mapped_directions(loaded, space: JointSpace, sign: float) -> tuple[Tensor, int]:
    """Σ over every right singular vector of every head of every layer of project(sign·v), and the count."""
    from sith.engine.towers import adapter_for

    blocks = adapter_for(loaded.model).blocks
    total = torch.zeros(loaded.info.output_dim, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            v = layer_svd(loaded, layer, lambda: decompose_layer(block, loaded.info.heads, layer)).V  # [H, d, r]
            vectors = v.transpose(1, 2).reshape(-1, v.shape[1])
            total += space.project(sign * vectors).double().sum(0).cpu()
            count += vectors.shape[0]
    return total, count


def directions_mean(loaded) -> Tensor:
    """Mean of the normalised mapped right singular vectors of every head of every layer.

    Depends on the SVD's sign rule (a flipped v_j maps elsewhere, because ln_post's bias makes
    the map affine); kept for comparison, ``poles_mean`` is the sign-free version.
    """
    total, count = _mapped_directions(loaded, JointSpace.for_model(loaded, None), 1.0)
    return (total / count).float()


def poles_mean(loaded) -> Tensor:
    """Sign-free data-free image mean: the mean over both poles ±v_j of every vector of every head.

    Every mapped direction shares the ln_post offset β_p P; averaging v and −v cancels the
    direction-specific part exactly to first order and keeps the shared offset, whatever sign
    convention the SVD used.
    """
    space = JointSpace.for_model(loaded, None)
    plus, count = _mapped_directions(loaded, space, 1.0)
    minus, _ = _mapped_directions(loaded, space, -1.0)
    return ((plus + minus) / (2 * count)).float()


def _preprocess_stats(loaded) -> tuple[Tensor, Tensor, int]:
    visual = loaded.model.visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=torch.float32)
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=torch.float32)
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return mean, std, size


def null_images(size: int, seed: int = 0) -> Tensor:
    """Synthetic content-free images [N, 3, size, size] in [0, 1]: 27 flat colours (the 3×3×3 RGB
    grid), 12 two-colour linear gradients (horizontal, vertical, diagonal) and 8 noise images
    (4 uniform pixel noise, 4 smooth noise). Deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.5, 1.0])
    flats = torch.cartesian_prod(levels, levels, levels)  # [27, 3]
    images = [flats[:, :, None, None].expand(-1, -1, size, size)]
    ramp = torch.linspace(0, 1, size)
    ramps = [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
             (ramp[None, :] + ramp[:, None]) / 2]
    grads = []
    for i in range(12):
        a, b = torch.rand(3, generator=gen), torch.rand(3, generator=gen)
        w = ramps[i % 3]
        grads.append(a[:, None, None] * (1 - w) + b[:, None, None] * w)
    images.append(torch.stack(grads))
    images.append(torch.rand(4, 3, size, size, generator=gen))
    coarse = torch.rand(4, 3, max(2, size // 8), max(2, size // 8), generator=gen)
    images.append(F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(images).clamp(0, 1)


def null_image_mean(loaded, batch_size: int = 16) -> Tensor:
    """Data-free image mean from synthetic null images (``null_images``): the mean of their unit
    embeddings. No dataset is read; the images only exercise the tower's own response to
    content-free input (flat colour, smooth gradients, noise)."""
    mean, std, size = _preprocess_stats(loaded)
    images = (null_images(size) - mean[None, :, None, None]) / std[None, :, None, None]
    device = next(loaded.model.parameters()).device
    total = torch.zeros(loaded.info.output_dim, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            emb = loaded.model.encode_image(images[start : start + batch_size].to(device), normalize=True)
            total += emb.double().sum(0).cpu()
    return (total / images.shape[0]).float()


# Data-free image means by name (``resolve_image_mean``); "poles" is the default.
DATA_FREE_MEANS = {"poles": poles_mean, "directions": directions_mean, "null-images": null_image_mean}
DEFAULT_IMAGE_MEAN = "poles"


def _tensor_from_file(path: Path) -> Tensor:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise InvalidInput("image_mean", f"{path.name} holds {len(tensors)} tensors; expected exactly one")
            value = next(iter(tensors.values()))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(value, dict) and len(value) == 1:
                value = next(iter(value.values()))
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput("image_mean", f"cannot read {path.name}: {exc}") from exc
    if not isinstance(value, Tensor):
        raise InvalidInput("image_mean", f"{path.name} does not hold a single tensor")
    return value


def _validate(mean: Tensor, output_dim: int) -> Tensor:
    mean = mean.detach().float().cpu()
    if mean.numel() == output_dim:
        mean = mean.reshape(-1)  # accept [1, D] as saved by keepdim means
    if mean.shape != (output_dim,):
        raise InvalidInput("image_mean", f"expected shape [{output_dim}], got {list(mean.shape)}")
    if not torch.isfinite(mean).all():
        raise InvalidInput("image_mean", "contains NaN or infinite values")
    return mean


def image_folder_mean(loaded, folder: Path, batch_size: int = 32) -> Tensor:
    """Mean of ``encode_image(normalize=True)`` over the images in a folder (recursive)."""
    from PIL import Image, UnidentifiedImageError

    if loaded.preprocess is None:
        raise InvalidInput("image_mean", "this model has no image preprocessing transform")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InvalidInput("image_mean", f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    device = next(loaded.model.parameters()).device
    total = torch.zeros(loaded.info.output_dim, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            batch = []
            for path in files[start : start + batch_size]:
                try:
                    with Image.open(path) as image:
                        batch.append(loaded.preprocess(image.convert("RGB")))
                except (OSError, UnidentifiedImageError) as exc:
                    raise InvalidInput("image_mean", f"cannot read image {path}: {exc}") from exc
            embeddings = loaded.model.encode_image(torch.stack(batch).to(device), normalize=True)
            total += embeddings.double().sum(0).cpu()
    return (total / len(files)).float()


def resolve_image_mean(loaded, image_mean: str | Path | Tensor | None) -> Tensor | None:
    """A data-free mean by name ("poles", the default; "directions"; "null-images"), "none"/None,
    a tensor, a tensor file (.pt/.npy/.safetensors) or an image folder (the paper's convention)."""
    output_dim = loaded.info.output_dim
    if image_mean is None:
        return None
    if isinstance(image_mean, Tensor):
        return _validate(image_mean, output_dim)
    if isinstance(image_mean, str) and image_mean.lower() == "none":
        return None
    if isinstance(image_mean, str) and image_mean.lower() in DATA_FREE_MEANS:
        return DATA_FREE_MEANS[image_mean.lower()](loaded)
    path = Path(image_mean).expanduser()
    if not path.exists():
        names = ", ".join(repr(n) for n in DATA_FREE_MEANS)
        raise InvalidInput("image_mean", f"{str(image_mean)!r} is not {names}, 'none', or an existing file/folder",
                           suggestions=[n for n in DATA_FREE_MEANS if n.startswith(str(image_mean)[:2].lower())])
    if path.is_dir():
        return image_folder_mean(loaded, path)
    if path.suffix.lower() not in TENSOR_SUFFIXES:
        raise InvalidInput("image_mean", f"unsupported file type {path.suffix!r}; use .pt, .npy, .safetensors or a folder")
    return _validate(_tensor_from_file(path), output_dim)
