"""The one interface the engine uses to reach into a vision tower (``TowerAdapter``).

An adapter knows a model *family*: where the attention blocks are, how each block's reading norm,
value rows and output columns are laid out (``blocks.BlockAccess``), and how the residual stream
is read out into the joint image-text space. Everything else in SITH (decomposition, joint-space
mapping, explanations, edits, export, adaptation) goes through it and never names a model class.

Joint map convention (all families): a residual direction v is read out as the image embedding of
a token sequence *every token of which is v* — the "constant-sequence readout". For a CLS-token
tower this is ``LN_post(v) @ P`` (spec §1.7) exactly; for average pooling it is the same; for an
attention-pool head (CoCa's pooler, SigLIP/PE's MAP head) the attention weights over identical
tokens sum to one, so the pool returns its value/output map of v and then runs its own norm and
MLP exactly. The readout is therefore exact for what it defines; it is not linear where the head
has an MLP (SigLIP/PE) or an activation (FastViT's final conv), see ``docs/towers.md`` for the
measured effect. ``linear_map`` is the linear part used only by the approximate inverse (spec §1.8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sith.engine.errors import InvalidInput
from sith.engine.towers.blocks import BlockAccess, block_access


class Readout(nn.Module):
    """``fn`` wrapped as a module, so ``JointSpace`` can call it like ``ln_post``.

    ``fn`` closes over the tower's own modules (they are not registered here, so nothing is
    duplicated in a state dict); ``weight`` is a one-element buffer that tells callers the
    readout's dtype and device, as ``ln_post.weight`` does.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], dtype_ref: Tensor) -> None:
        super().__init__()
        self._fn = fn
        self.register_buffer("weight", dtype_ref.detach().reshape(-1)[:1].clone(), persistent=False)

    def forward(self, vectors: Tensor) -> Tensor:
        return self._fn(vectors)


class TowerAdapter:
    """Family-independent access to a CLIP-style model's vision tower (see module docstring)."""

    family: str = "?"
    #: What the data-free joint map can and cannot say for this family (shown in docs/coverage).
    joint_note: str = "exact: LN_post(v) @ P"

    def __init__(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        self.model = model
        self.blocks = list(blocks)
        if not self.blocks:
            raise InvalidInput("model", f"{self.family}: the vision tower has no attention blocks")
        self._access = [block_access(b) for b in self.blocks]
        first = self._access[0]
        for i, acc in enumerate(self._access):
            if (acc.num_heads, acc.head_dim, acc.width) != (first.num_heads, first.head_dim, first.width):
                raise InvalidInput("model", f"{self.family}: block {i} has a different shape "
                                   f"({acc.num_heads}x{acc.head_dim}, width {acc.width}) from block 0")

    # ---------------------------------------------------------------- shape
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return self._access[0].num_heads

    @property
    def head_dim(self) -> int:
        return self._access[0].head_dim

    @property
    def width(self) -> int:
        return self._access[0].width

    @property
    def output_dim(self) -> int:
        readout, proj, _ = self.joint_pieces()
        ref = readout.weight
        with torch.no_grad():
            z = readout(torch.zeros(1, self.width, dtype=ref.dtype, device=ref.device))
        return int(proj.shape[1]) if proj is not None else int(z.shape[-1])

    @property
    def image_size(self):
        return getattr(self.visual, "image_size", None)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    def access(self, layer: int) -> BlockAccess:
        if not 0 <= layer < self.num_layers:
            raise InvalidInput("layers", f"layer {layer} does not exist (tower has {self.num_layers} blocks)")
        return self._access[layer]

    # ---------------------------------------------------------------- heads
    def vo_factors(self, layer: int) -> tuple[Tensor, Tensor]:
        """Folded, centred W_V [H, d, dh] and W_O [H, dh, d] of one block."""
        return self.access(layer).vo_factors()

    def head_value_bias(self, layer: int) -> Tensor:
        return self.access(layer).head_value_bias()

    def write_head_output(self, layer: int, head: int, w_o_folded: Tensor) -> None:
        """Set head ``head``'s folded centred W_O [dh, d] in place, in stock layout (bias compensated)."""
        if not 0 <= head < self.num_heads:
            raise InvalidInput("heads", f"head {head} is out of range for {self.num_heads} heads")
        self.access(layer).write_head(head, w_o_folded)

    def mlp_output(self, layer: int) -> Tensor | None:
        return self.access(layer).mlp_output()

    def write_mlp_output(self, layer: int, w_folded: Tensor) -> None:
        self.access(layer).write_mlp_output(w_folded)

    def mlp_input(self, layer: int) -> tuple[nn.Module, nn.Linear, nn.Module] | None:
        """(LayerNorm, input Linear, activation) of block ``layer``'s MLP, or None where it is not that shape."""
        return self.access(layer).mlp_in()

    def readout_start(self) -> Tensor | None:
        """The read-out token's image-independent start [d] (class embedding + its position, through any
        pre-norm), or None where the read-out has no such token (MAP heads, mean pooling)."""
        return None

    # ---------------------------------------------------------------- joint space
    def joint_pieces(self) -> tuple[nn.Module, Tensor | None, Tensor | None]:
        """(readout [B, d] -> [B, D'], final projection [D', D] or None, linear part [d, D] for the inverse)."""
        raise NotImplementedError

    def pullback_matrix(self) -> Tensor | None:
        """The readout's linear part *with* its norms' gains γ, [d, D]: ``pullback_matrix() @ r`` is the
        residual direction whose write moves the embedding along r (before centring). None where the
        readout has a non-linear layer with no linear part (FastViT's final conv)."""
        raise NotImplementedError

    def set_projection(self, proj: Tensor) -> None:
        """Replace the final linear projection (row form, [D', D]) in place."""
        raise InvalidInput("operator", f"{self.family}: this tower has no final linear projection to edit")

    @torch.no_grad()
    def _set_linear_projection(self, linear: nn.Linear | None, proj: Tensor) -> None:
        """``set_projection`` for families whose final projection is an ``nn.Linear`` (weight = Pᵀ)."""
        if linear is None:
            TowerAdapter.set_projection(self, proj)  # the family has none: the shared error
        if tuple(proj.shape) != tuple(linear.weight.T.shape):
            raise InvalidInput("projection", f"expected shape {list(linear.weight.T.shape)}, got {list(proj.shape)}")
        linear.weight.copy_(proj.T.to(linear.weight.dtype))

    def output_projection(self) -> Tensor | None:
        """The last linear map of the readout in row form [D', D] (e = x P + b), or None where the
        readout does not end in one."""
        return self.joint_pieces()[1]

    def rewrite_output(self, right: Tensor) -> None:
        """Make the embedding e·T for every image: P ← P T (and a bias b ← b T where the family has one)."""
        proj = self.output_projection()
        if proj is None:
            self.set_projection(right)  # raises the family's own "no final projection" error
        self.set_projection((proj.double() @ right.to(proj.device).double()).to(proj.dtype))

    # ---------------------------------------------------------------- identity
    def vision_state(self) -> dict[str, Tensor]:
        """Every tensor of the vision tower and its joint map (the vision hash covers these)."""
        return self.visual.state_dict()

    def text_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("visual.")}
