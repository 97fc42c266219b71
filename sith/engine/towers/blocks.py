"""Per-block access to an attention block's reading norm, value rows and output columns.

Every supported attention block, whatever its class, is reduced to the same pieces (row-vector
form, ``y = x Wᵀ + b`` for every Linear):

* the **reading norm**: the per-channel affine (γ, β) applied to the normalised residual stream
  before the value projection. A LayerNorm standardises each token first (zero mean), so the read
  rows of W_V may be centred; a BatchNorm (FastViT) only rescales channels with running
  statistics, so it folds to γ = w/√(var+ε), β = b − mean·γ and nothing is centred;
* the raw **value rows** [H·dh, d] and value bias (fused qkv, separate q/k/v or in_proj);
* the **output Linear** whose columns [h·dh:(h+1)·dh] are head h's write map;
* per-channel scales between them: the affine γ of a norm *inside* attention (EVA02's
  ``attn.norm``) on the head-output side, and a LayerScale on the residual side.

``vo_factors`` folds all of these into W_V [H, d, dh] and W_O [H, dh, d] (centred when the stream's
consumers are LayerNorms) and ``write_head`` inverts exactly that fold, so writing back the factors
it returned leaves the weights unchanged up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sith.engine.errors import InvalidInput


@dataclass
class BlockAccess:
    """Where one attention block keeps the pieces SITH folds (see module docstring)."""

    block: nn.Module
    num_heads: int
    head_dim: int
    width: int
    out: nn.Linear  # out_proj / proj: weight [d, H·dh]
    centre: bool  # LayerNorm-read stream (centring exact) vs BatchNorm-read (no centring)
    kind: str

    # ---------------------------------------------------------------- per-family hooks
    def read_affine(self) -> tuple[Tensor | None, Tensor | None]:
        """(γ [d], β [d]) of the reading norm, as applied to the standardised input."""
        raise NotImplementedError

    def value_weight(self) -> Tensor:
        """Raw value rows [H·dh, d]."""
        raise NotImplementedError

    def set_value_weight(self, weight: Tensor) -> None:
        raise NotImplementedError

    def value_bias(self) -> Tensor | None:
        raise NotImplementedError

    def inner_scale(self) -> Tensor | None:
        """γ [H·dh] of a norm between attention and the output Linear (EVA02), else None."""
        return None

    def layer_scale(self) -> Tensor | None:
        """LayerScale γ [d] on the head outputs, else None."""
        return None

    def mlp_out(self) -> nn.Linear | nn.Conv2d | None:
        """The Linear (or 1×1 convolution) that writes the MLP's output into the stream (fc2 / c_proj), if any."""
        return None

    def attention_weights(self) -> list[tuple[nn.Module, str]]:
        """(module, parameter name) of every weight mapping the stream to queries, keys and values
        (fused or separate), then the output Linear's: where a low-rank fine-tune (LoRA) of the
        attention goes, whatever the block's class."""
        raise NotImplementedError

    def mlp_scale(self) -> Tensor | None:
        return None

    def mlp_in(self) -> tuple[nn.Module, nn.Linear, nn.Module] | None:
        """(reading norm, input Linear, activation) of the MLP, where it is a plain norm → Linear →
        activation → Linear (the data-free write-strength estimate of sith.edits needs them), else None."""
        return None

    # ---------------------------------------------------------------- shared maths
    def _out_scale(self) -> tuple[Tensor | None, Tensor | None]:
        inner = self.inner_scale()
        ls = self.layer_scale()
        return (None if inner is None else inner.detach()), (None if ls is None else ls.detach())

    def folded_out(self) -> Tensor:
        """Folded, *uncentred* write matrix [d, H·dh] (out weight with inner/LayerScale γ)."""
        w = self.out.weight.detach()
        inner, ls = self._out_scale()
        if inner is not None:
            w = w * inner[None, :]
        if ls is not None:
            w = w * ls[:, None]
        return w

    def vo_factors(self) -> tuple[Tensor, Tensor]:
        h, dh, d = self.num_heads, self.head_dim, self.width
        gamma, _ = self.read_affine()
        w_v = self.value_weight().detach()
        if gamma is not None:
            w_v = w_v * gamma.detach()[None, :]
        if self.centre:
            w_v = w_v - w_v.mean(dim=1, keepdim=True)
        w_out = self.folded_out()
        if self.centre:
            w_out = w_out - w_out.mean(dim=0, keepdim=True)
        return (w_v.reshape(h, dh, d).transpose(1, 2).contiguous(),
                w_out.reshape(d, h, dh).permute(1, 2, 0).contiguous())

    def head_value_bias(self) -> Tensor:
        """c_h = b_V^h + W_V^h β [H, dh]: the constant a head adds to its values."""
        w_v = self.value_weight().detach()
        bias = self.value_bias()
        c = bias.detach().clone() if bias is not None else w_v.new_zeros(w_v.shape[0])
        _, beta = self.read_affine()
        if beta is not None:
            c = c + w_v @ beta.detach()
        return c.reshape(self.num_heads, self.head_dim)

    @torch.no_grad()
    def write_head(self, head: int, w_o_folded: Tensor) -> None:
        """Set head ``head``'s folded (centred) W_O [dh, d] in place, in stock layout.

        Adds back the per-column mean the centring removed, divides out the LayerScale and the
        inner norm's γ, and moves the head's constant value term c_h·(W_O − W_O') into the output
        bias so that only the VO matrix changes (SITH's folded-bias semantics).
        """
        dh = self.head_dim
        cols = slice(head * dh, (head + 1) * dh)
        weight = self.out.weight
        inner, ls = self._out_scale()
        inner_h = inner[cols].double() if inner is not None else None
        ls_d = ls.double() if ls is not None else None
        for name, scale in (("inner norm weight", inner_h), ("LayerScale", ls_d)):
            if scale is not None and bool((scale == 0).any()):
                raise InvalidInput("model", f"{self.kind}: a zero {name} entry cannot be unfolded")
        old_raw = weight[:, cols].double().T  # [dh, d]
        old_folded = old_raw
        if inner_h is not None:
            old_folded = old_folded * inner_h[:, None]
        if ls_d is not None:
            old_folded = old_folded * ls_d[None, :]
        new_folded = w_o_folded.to(old_raw.device).double()
        if self.centre:
            new_folded = new_folded + old_folded.mean(dim=1, keepdim=True)
        new_raw = new_folded
        if ls_d is not None:
            new_raw = new_raw / ls_d[None, :]
        if inner_h is not None:
            new_raw = new_raw / inner_h[:, None]
        c_h = self.head_value_bias()[head].double().to(old_raw.device)
        if inner_h is not None:
            c_h = c_h * inner_h
        if self.out.bias is not None:
            self.out.bias += (c_h @ (old_raw - new_raw)).to(self.out.bias.dtype)
        elif bool((c_h.abs() > 0).any()):
            raise InvalidInput("model", f"{self.kind}: the output projection has no bias to absorb the "
                               "head's constant value term")
        weight[:, cols] = new_raw.T.to(weight.dtype)

    def mlp_output(self) -> Tensor | None:
        """The MLP's write matrix [m, d] (row form, LayerScale folded, centred when exact)."""
        fc = self.mlp_out()
        if fc is None:
            return None
        w = _as_matrix(fc.weight.detach()).T  # [m, d]
        ls = self.mlp_scale()
        if ls is not None:
            w = w * ls.detach()[None, :]
        return w - w.mean(dim=1, keepdim=True) if self.centre else w

    @torch.no_grad()
    def write_mlp_output(self, w_folded: Tensor) -> None:
        fc = self.mlp_out()
        if fc is None:
            raise InvalidInput("layer", f"{self.kind} has no MLP output to write")
        old = _as_matrix(fc.weight).double().T
        ls = self.mlp_scale()
        ls_d = ls.double() if ls is not None else None
        old_folded = old * ls_d[None, :] if ls_d is not None else old
        new = w_folded.to(old.device).double()
        if tuple(new.shape) != tuple(old.shape):
            raise InvalidInput("mlp", f"expected shape {list(old.shape)}, got {list(new.shape)}")
        if self.centre:
            new = new + old_folded.mean(dim=1, keepdim=True)
        if ls_d is not None:
            new = new / ls_d[None, :]
        fc.weight.copy_(new.T.reshape(fc.weight.shape).to(fc.weight.dtype))


def _as_matrix(weight: Tensor) -> Tensor:
    """A Linear's weight [out, in], or a 1×1 convolution's [out, in, 1, 1] as the same per-position map."""
    return weight.reshape(weight.shape[0], -1)


def _mlp_in(block: nn.Module, norm: str, fc: str, act: str) -> tuple[nn.Module, nn.Linear, nn.Module] | None:
    mlp = getattr(block, "mlp", None)
    parts = (getattr(block, norm, None), getattr(mlp, fc, None), getattr(mlp, act, None))
    if not isinstance(parts[0], nn.LayerNorm) or not isinstance(parts[1], nn.Linear) or parts[2] is None:
        return None  # SwiGLU, BatchNorm readers, …: no plain LN → Linear → activation
    return parts


def _gamma(module: nn.Module | None) -> Tensor | None:
    if module is None:
        return None
    g = getattr(module, "gamma", None)
    if g is None:
        g = getattr(module, "weight", None) if not isinstance(module, nn.Identity) else None
    return None if g is None else g.reshape(-1)


def _ln_affine(norm: nn.Module, kind: str) -> tuple[Tensor | None, Tensor | None]:
    if not isinstance(norm, nn.LayerNorm):
        raise InvalidInput("model", f"{kind}: reading norm is {type(norm).__name__}, expected LayerNorm")
    return norm.weight, norm.bias


class MHABlock(BlockAccess):
    """open_clip ``ResidualAttentionBlock`` (nn.MultiheadAttention; ln_1; optional ls_1)."""

    def read_affine(self):
        return _ln_affine(self.block.ln_1, self.kind)

    def value_weight(self):
        d = self.width
        return self.block.attn.in_proj_weight[2 * d : 3 * d]

    def set_value_weight(self, weight):
        d = self.width
        self.block.attn.in_proj_weight.data[2 * d : 3 * d] = weight

    def value_bias(self):
        b = self.block.attn.in_proj_bias
        return None if b is None else b[2 * self.width : 3 * self.width]

    def attention_weights(self):
        return [(self.block.attn, "in_proj_weight"), (self.out, "weight")]

    def layer_scale(self):
        return _gamma(getattr(self.block, "ls_1", None))

    def mlp_out(self):
        return getattr(getattr(self.block, "mlp", None), "c_proj", None)

    def mlp_in(self):
        return _mlp_in(self.block, "ln_2", "c_fc", "gelu")

    def mlp_scale(self):
        return _gamma(getattr(self.block, "ls_2", None))


class TimmBlock(BlockAccess):
    """timm ``Block`` / ``EvaBlock``: fused ``qkv`` (+ q_bias/v_bias) or separate q/k/v projections."""

    def read_affine(self):
        return _ln_affine(self.block.norm1, self.kind)

    def _split(self) -> bool:
        return getattr(self.block.attn, "v_proj", None) is not None

    def value_weight(self):
        attn = self.block.attn
        if self._split():
            return attn.v_proj.weight
        d = self.num_heads * self.head_dim
        return attn.qkv.weight[2 * d : 3 * d]

    def set_value_weight(self, weight):
        attn = self.block.attn
        if self._split():
            attn.v_proj.weight.data.copy_(weight)
        else:
            d = self.num_heads * self.head_dim
            attn.qkv.weight.data[2 * d : 3 * d] = weight

    def value_bias(self):
        attn = self.block.attn
        if self._split():
            return attn.v_proj.bias
        if getattr(attn, "v_bias", None) is not None:
            return attn.v_bias
        b = attn.qkv.bias
        d = self.num_heads * self.head_dim
        return None if b is None else b[2 * d : 3 * d]

    def attention_weights(self):
        attn = self.block.attn
        inputs = [attn.q_proj, attn.k_proj, attn.v_proj] if self._split() else [attn.qkv]
        return [(m, "weight") for m in inputs] + [(self.out, "weight")]

    def inner_scale(self):
        norm = getattr(self.block.attn, "norm", None)
        if norm is None or isinstance(norm, nn.Identity):
            return None
        return norm.weight

    def layer_scale(self):
        ls = getattr(self.block, "ls1", None)
        if ls is not None:
            return _gamma(ls)
        return getattr(self.block, "gamma_1", None)

    def mlp_out(self):
        return getattr(getattr(self.block, "mlp", None), "fc2", None)

    def mlp_in(self):
        return _mlp_in(self.block, "norm2", "fc1", "act")

    def mlp_scale(self):
        ls = getattr(self.block, "ls2", None)
        if ls is not None:
            return _gamma(ls)
        return getattr(self.block, "gamma_2", None)


class FastViTBlock(BlockAccess):
    """timm FastViT ``AttentionBlock``: BatchNorm2d reader, fused qkv, LayerScale2d."""

    def read_affine(self):
        bn = self.block.norm
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
            raise InvalidInput("model", f"{self.kind}: reading norm is {type(bn).__name__}, expected BatchNorm2d")
        scale = bn.running_var.detach().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        shift = -bn.running_mean.detach() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach()
        return scale, shift

    def value_weight(self):
        d = self.num_heads * self.head_dim
        return self.block.token_mixer.qkv.weight[2 * d : 3 * d]

    def set_value_weight(self, weight):
        d = self.num_heads * self.head_dim
        self.block.token_mixer.qkv.weight.data[2 * d : 3 * d] = weight

    def value_bias(self):
        b = self.block.token_mixer.qkv.bias
        d = self.num_heads * self.head_dim
        return None if b is None else b[2 * d : 3 * d]

    def attention_weights(self):
        return [(self.block.token_mixer.qkv, "weight"), (self.out, "weight")]

    def layer_scale(self):
        return _gamma(getattr(self.block, "layer_scale_1", None))

    def mlp_out(self):
        """ConvMlp's ``fc2``, a 1×1 convolution: per position, the same map as a Linear."""
        fc = getattr(getattr(self.block, "mlp", None), "fc2", None)
        return fc if isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1 else None

    def mlp_scale(self):
        return _gamma(getattr(self.block, "layer_scale_2", None))


class HFBlock(BlockAccess):
    """transformers ``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` (layer_norm1, self_attn.v_proj/out_proj)."""

    def read_affine(self):
        return _ln_affine(self.block.layer_norm1, self.kind)

    def value_weight(self):
        return self.block.self_attn.v_proj.weight

    def set_value_weight(self, weight):
        self.block.self_attn.v_proj.weight.data.copy_(weight)

    def value_bias(self):
        return self.block.self_attn.v_proj.bias

    def attention_weights(self):
        attn = self.block.self_attn
        return [(m, "weight") for m in (attn.q_proj, attn.k_proj, attn.v_proj)] + [(self.out, "weight")]

    def mlp_out(self):
        return getattr(getattr(self.block, "mlp", None), "fc2", None)

    def mlp_in(self):
        return _mlp_in(self.block, "layer_norm2", "fc1", "activation_fn")


def block_access(block: nn.Module) -> BlockAccess:
    """The access object for one attention block; InvalidInput naming the block type otherwise."""
    kind = type(block).__name__
    if "PostNorm" in kind or kind == "ResPostBlock":  # the norm sits after attention: nothing reads the stream
        raise InvalidInput("model", f"{kind} is a post-norm block (its norm follows attention), which SITH's "
                           "fold-the-reading-norm convention does not cover")
    attn = getattr(block, "attn", None)
    if isinstance(attn, nn.MultiheadAttention) and hasattr(block, "ln_1"):
        if not attn._qkv_same_embed_dim:
            raise InvalidInput("model", f"{kind}: attention with separate k/v dims is not supported")
        d = attn.embed_dim
        return MHABlock(block, attn.num_heads, attn.head_dim, d, attn.out_proj, True, kind)
    if attn is not None and hasattr(block, "norm1") and hasattr(attn, "proj"):
        heads = attn.num_heads
        if getattr(attn, "v_proj", None) is not None:
            inner = attn.v_proj.out_features
        elif getattr(attn, "qkv", None) is not None:
            inner = attn.qkv.out_features // 3
        else:
            raise InvalidInput("model", f"{kind}: attention {type(attn).__name__} has neither qkv nor v_proj")
        width = attn.proj.out_features
        return TimmBlock(block, heads, inner // heads, width, attn.proj, True, kind)
    mixer = getattr(block, "token_mixer", None)
    if mixer is not None and hasattr(mixer, "qkv") and hasattr(mixer, "proj") and hasattr(block, "norm"):
        heads = mixer.num_heads
        return FastViTBlock(block, heads, mixer.head_dim, mixer.proj.out_features, mixer.proj, False, kind)
    self_attn = getattr(block, "self_attn", None)
    if self_attn is not None and hasattr(self_attn, "v_proj") and hasattr(block, "layer_norm1"):
        heads = getattr(self_attn, "num_heads", None) or self_attn.config.num_attention_heads
        width = self_attn.out_proj.out_features
        inner = self_attn.v_proj.out_features
        return HFBlock(block, heads, inner // heads, width, self_attn.out_proj, True, kind)
    raise InvalidInput("model", f"{kind} is not a supported attention block")
