"""Decode client PNG/JPEG bytes under pixel budgets, refusing over-budget input before decoding.

A few KB of PNG can declare tens of megapixels (a one-bit 6000x6667 image compresses to 5 KB and
decodes to ~150 MiB). So every image's header is read first (``PIL.Image.open`` parses only the
header), and the declared size is checked against three budgets before a single pixel is decoded:
per image, per request (all images of the call) and in flight (all images this process is decoding
at once; a call waits briefly for budget, then gets RESOURCE_EXHAUSTED). JPEGs are decoded straight at
the reduced scale the model needs (``Image.draft``), which cuts their CPU and memory by up to 64x.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel
from sith_server.config import Limits
from sith_server.limits import BudgetExceeded, Pool

FORMATS = ("PNG", "JPEG")


@dataclass
class ImageBudget:
    """The three pixel budgets; one instance per process (memory is per process)."""

    per_image: int
    per_request: int
    in_flight: Pool

    @classmethod
    def from_limits(cls, limits: Limits) -> ImageBudget:
        return cls(limits.image_max_pixels, limits.request_max_pixels,
                   Pool(limits.inflight_max_pixels, "pixels", limits.inflight_wait_s))


_budget = ImageBudget.from_limits(Limits())
_budget_lock = threading.Lock()


def configure(limits: Limits) -> ImageBudget:
    """Set this process's budgets (the app does it from ServerConfig.limits); returns the new budget."""
    global _budget
    with _budget_lock:
        _budget = ImageBudget.from_limits(limits)
        # PIL's own bomb guard (warn above, refuse above 2x): keep it at least as strict as ours.
        Image.MAX_IMAGE_PIXELS = limits.image_max_pixels
        return _budget


def current_budget() -> ImageBudget:
    return _budget


@dataclass
class Header:
    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, field: str, per_image: int) -> Header:
    """Format and size from the header only; InvalidInput / BudgetExceeded without decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                header = Header(int(image.width), int(image.height), str(image.format))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BudgetExceeded(field, per_image, f"image declares too many pixels ({exc})") from None
    except UnidentifiedImageError:  # PIL's message names the BytesIO object, not the problem
        raise InvalidInput(field, f"not a PNG or JPEG image ({len(data)} bytes that no image decoder recognises)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(field, f"cannot read an image header: {exc}") from None
    if header.format not in FORMATS:
        raise InvalidInput(field, f"expected PNG or JPEG, got {header.format}")
    if header.pixels > per_image:
        raise BudgetExceeded(field, per_image, f"image of {header.width}x{header.height} = {header.pixels:,} pixels "
                             "is over the per-image budget; downscale it before sending")
    return header


def _target_size(loaded: LoadedModel) -> int:
    size = loaded.model.visual.image_size
    return int(max(size) if isinstance(size, (tuple, list)) else size)


def decode_images(loaded: LoadedModel, encoded: Sequence[bytes], field: str = "images",
                  indices: Sequence[int] | None = None, budget: ImageBudget | None = None) -> list[torch.Tensor]:
    """Preprocessed [3, S, S] tensors for encoded PNG/JPEG images.

    ``indices`` are the images' positions in the request (for field paths ``images[i].encoded``);
    default 0..n-1. Every header is checked before any image is decoded.
    """
    budget = budget or _budget
    if loaded.preprocess is None:
        raise InvalidInput(field, "this model has no image transform; send preprocessed tensors")
    positions = list(indices) if indices is not None else list(range(len(encoded)))
    names = [f"{field}[{i}].encoded" for i in positions]
    headers = [read_header(data, name, budget.per_image) for data, name in zip(encoded, names)]
    total = sum(h.pixels for h in headers)
    if total > budget.per_request:
        raise BudgetExceeded(field, budget.per_request, f"the request's images add up to {total:,} pixels, over the "
                             "per-request budget; send fewer or smaller images per call")
    target = _target_size(loaded)
    out = []
    with budget.in_flight.take(total, field):
        for data, name, header in zip(encoded, names, headers):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    if header.format == "JPEG":
                        image.draft("RGB", (target, target))   # decode at 1/2..1/8 scale when larger
                    out.append(loaded.preprocess(image.convert("RGB")))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise InvalidInput(name, f"cannot decode image: {exc}") from None
    return out
