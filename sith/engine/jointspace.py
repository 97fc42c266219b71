"""Residual-stream directions -> the joint image-text space, and the approximate way back (spec §1.7–1.8).

A write direction v is read out the way the CLS token is: ``z = LN_post(v) @ P`` with the *full*
ln_post (its bias β_p adds the same offset β_p P to every direction; the authors include it), then
normalised, then centred by an image mean μ and normalised again, because the text dictionary is
centred by its own mean too and both modalities must meet around the origin (modality gap).

The paper's μ is the mean normalised image embedding over CC12M, which needs data. The data-free
default, ``image_mean="directions"``, uses instead the mean of the normalised mapped right singular
vectors of **all heads of all layers** of the tower. Why: every mapped direction shares the ln_post
offset β_p P and the tower's common output bias, which is exactly the shared component the image
mean removes; averaging over the whole tower (not just the analysed layers) makes μ a property of
the model alone, so codes for layer 20 do not change when layer 21 is also requested. Users with
images can pass a folder (or a precomputed tensor) to get the paper's convention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sith.engine.decomposition import decompose_layer
from sith.engine.errors import InvalidInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TENSOR_SUFFIXES = {".pt", ".pth", ".npy", ".safetensors"}


class JointSpace:
    """Maps d-dim residual directions to unit, centred joint-space vectors and back."""

    def __init__(self, ln_post: nn.LayerNorm, proj: Tensor | None, image_mean: Tensor | None) -> None:
        self.ln_post = ln_post
        self.proj = proj.detach() if proj is not None else None
        self.image_mean = image_mean.detach().float() if image_mean is not None else None
        self._pinv: Tensor | None = None

    @classmethod
    def for_model(cls, loaded, image_mean: Tensor | None) -> JointSpace:
        visual = loaded.model.visual
        return cls(visual.ln_post, visual.proj, image_mean)

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
            self._pinv = torch.linalg.pinv(self.proj.double()).float() if self.proj is not None else None
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
        return F.normalize(y, dim=-1)


def directions_mean(loaded) -> Tensor:
    """Data-free image mean: mean of the normalised mapped right singular vectors of every head of every layer."""
    space = JointSpace.for_model(loaded, None)
    blocks = loaded.model.visual.transformer.resblocks
    total = torch.zeros(loaded.info.output_dim, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            v = decompose_layer(block, loaded.info.heads, layer).V  # [H, d, r]
            vectors = v.transpose(1, 2).reshape(-1, v.shape[1])
            total += space.project(vectors).double().sum(0).cpu()
            count += vectors.shape[0]
    return (total / count).float()


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
    """"directions" (data-free default), "none"/None, a tensor, a tensor file (.pt/.npy/.safetensors) or an image folder."""
    output_dim = loaded.info.output_dim
    if image_mean is None:
        return None
    if isinstance(image_mean, Tensor):
        return _validate(image_mean, output_dim)
    if isinstance(image_mean, str) and image_mean.lower() == "none":
        return None
    if isinstance(image_mean, str) and image_mean.lower() == "directions":
        return directions_mean(loaded)
    path = Path(image_mean).expanduser()
    if not path.exists():
        raise InvalidInput("image_mean", f"{str(image_mean)!r} is not 'directions', 'none', or an existing file/folder")
    if path.is_dir():
        return image_folder_mean(loaded, path)
    if path.suffix.lower() not in TENSOR_SUFFIXES:
        raise InvalidInput("image_mean", f"unsupported file type {path.suffix!r}; use .pt, .npy, .safetensors or a folder")
    return _validate(_tensor_from_file(path), output_dim)
