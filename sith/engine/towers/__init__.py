"""Tower adapters: one interface over every CLIP vision-tower family SITH supports.

``adapter_for(model)`` returns the ``TowerAdapter`` for an open_clip ``CLIP``/``CustomTextCLIP``/
``CoCa`` (native ViT, or a timm ViT/EVA/PE/FastViT trunk) or a wrapped transformers CLIP/SigLIP
model (``hf.HFModel``); anything else is an ``InvalidInput`` naming the tower type. See
``docs/towers.md`` for the conventions per family and the coverage table.
"""

from __future__ import annotations

from torch import nn

from sith.engine.errors import InvalidInput
from sith.engine.towers import tiny  # noqa: F401  (registers the tiny timm towers)
from sith.engine.towers.base import Readout, TowerAdapter
from sith.engine.towers.blocks import BlockAccess, block_access

__all__ = ["TowerAdapter", "BlockAccess", "Readout", "adapter_for", "block_access", "tower_kind"]


def tower_kind(model: nn.Module) -> str:
    """Human name of a model's vision tower (for error messages and the coverage table)."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return type(model).__name__
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return f"timm {type(trunk).__name__}"
    return type(visual).__name__


def adapter_for(model: nn.Module, field: str = "model") -> TowerAdapter:
    """The adapter for ``model`` (or a ``LoadedModel``); InvalidInput naming the tower when unsupported."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    return _build(model, field)  # cheap (no weights are read), so never cached on the model


def _build(model: nn.Module, field: str) -> TowerAdapter:
    from sith.engine.towers.hf import HFModel

    if isinstance(model, HFModel):
        from sith.engine.towers.hf import HFTower

        return HFTower(model)
    visual = getattr(model, "visual", None)
    if visual is None:
        raise InvalidInput(field, f"{type(model).__name__} is not a CLIP model with a vision tower")
    from open_clip.transformer import VisionTransformer

    from sith.engine.towers.openclip import OpenClipViT, TimmTower

    if isinstance(visual, VisionTransformer):
        try:
            return OpenClipViT(model)
        except InvalidInput as exc:
            raise InvalidInput(field, exc.reason) from exc
    if getattr(visual, "trunk", None) is not None:
        try:
            return TimmTower(model)
        except InvalidInput as exc:
            raise InvalidInput(field, exc.reason) from exc
    raise InvalidInput(field, f"vision tower is {tower_kind(model)}, which is not a transformer SITH can "
                       "decompose (supported: open_clip VisionTransformer, timm ViT/EVA/PE/FastViT, "
                       "transformers CLIP/SigLIP)")
