"""open_clip's native ``VisionTransformer`` (CLIP, CustomTextCLIP, CoCa, CLIPA) and timm towers inside open_clip."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sith.engine.errors import InvalidInput
from sith.engine.towers.base import Readout, TowerAdapter


def _mha_value_out(attn: nn.MultiheadAttention) -> Tensor:
    """Row-form value -> output map [d_in, d_model] of an nn.MultiheadAttention (one key: weights = 1)."""
    d = attn.embed_dim
    w_v = attn.in_proj_weight[2 * d : 3 * d] if attn._qkv_same_embed_dim else attn.v_proj_weight
    return w_v.detach().T @ attn.out_proj.weight.detach().T


class OpenClipViT(TowerAdapter):
    """open_clip ``VisionTransformer``: ``transformer.resblocks``, ``ln_post`` and ``proj``."""

    family = "open_clip-vit"

    def __init__(self, model: nn.Module) -> None:
        visual = model.visual
        super().__init__(model, list(visual.transformer.resblocks))
        if visual.attn_pool is not None:
            self.family = "open_clip-vit-attnpool"
            self.joint_note = ("exact for the constant-sequence readout: the attentional pooler over identical "
                               "tokens returns its value/output map of v, then ln_post and proj")
        elif visual.final_ln_after_pool or getattr(visual, "pool_type", "tok") != "tok":
            self.family = "open_clip-vit-pooled"
            self.joint_note = "exact: pooling of identical tokens returns v, then ln_post and proj"

    @torch.no_grad()
    def readout_start(self) -> Tensor | None:
        visual = self.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            return None
        start = visual.class_embedding + visual.positional_embedding[0]
        return visual.ln_pre(start.reshape(1, -1)).reshape(-1)

    def _pool(self, vectors: Tensor) -> Tensor:
        visual = self.visual
        tokens = vectors[:, None, :].expand(-1, 2, -1)  # pooling of identical tokens returns v
        pooled, _ = visual._pool(tokens)
        return pooled

    def joint_pieces(self):
        visual = self.visual
        proj = visual.proj.detach() if visual.proj is not None else None
        if visual.attn_pool is None and not visual.final_ln_after_pool:
            return visual.ln_post, proj, proj
        readout = Readout(self._pool, visual.ln_post.weight)
        linear = None
        if visual.attn_pool is not None:
            pool = visual.attn_pool_contrastive if visual.attn_pool_contrastive is not None else visual.attn_pool
            linear = _mha_value_out(pool.attn)
            if proj is not None:
                linear = linear @ proj
        else:
            linear = proj
        return readout, proj, linear

    def pullback_matrix(self) -> Tensor:
        visual = self.visual
        m = torch.diag(visual.ln_post.weight.detach())
        if visual.attn_pool is not None:
            pool = visual.attn_pool_contrastive if visual.attn_pool_contrastive is not None else visual.attn_pool
            m = torch.diag(pool.ln_k.weight.detach()) @ _mha_value_out(pool.attn) @ m
        return m @ visual.proj.detach() if visual.proj is not None else m

    def set_projection(self, proj: Tensor) -> None:
        visual = self.visual
        if visual.proj is None:
            super().set_projection(proj)
        if tuple(proj.shape) != tuple(visual.proj.shape):
            raise InvalidInput("projection", f"expected shape {list(visual.proj.shape)}, got {list(proj.shape)}")
        with torch.no_grad():
            visual.proj.copy_(proj.to(visual.proj.dtype))


TIMM_VIT_CLASSES = ("VisionTransformer", "Eva", "VisionTransformerRelPos")


class TimmTower(TowerAdapter):
    """open_clip ``TimmModel`` around a timm ViT / EVA / PE trunk, or a FastViT hybrid (attention blocks only)."""

    def __init__(self, model: nn.Module) -> None:
        trunk = model.visual.trunk
        kind = type(trunk).__name__
        self.hybrid = kind == "FastVit"
        if self.hybrid:
            self.family = "timm-fastvit"
            blocks = self._fastvit_blocks(trunk)
            self.joint_note = ("constant-map readout through final_conv (conv+BN+GELU+SE), avg pool and head: "
                               "non-linear, linearised at v = 0 for pull-backs and the inverse; only the last "
                               "stage's attention blocks are covered; no centring (BatchNorm readers do not "
                               "remove the mean)")
        elif kind in TIMM_VIT_CLASSES:
            self.family = "timm-eva" if kind == "Eva" else "timm-vit"
            blocks = list(trunk.blocks)
            pool = getattr(trunk, "attn_pool", None)
            if pool is not None:
                self.family += "-map"
                self.joint_note = ("constant-sequence readout through the MAP head: exact for that input, "
                                   "non-linear (the head's MLP); the inverse uses its value/output linear part")
            else:
                self.joint_note = "exact: final norm, pooling of identical tokens, fc_norm and head/proj"
            if any(not isinstance(getattr(b.attn, "norm", nn.Identity()), nn.Identity) for b in blocks):
                self.joint_note += ("; attention-internal norm folded as its affine γ only (its per-token "
                                    "standardisation is shared by all heads: see docs/towers.md)")
        else:
            arch = getattr(trunk, "default_cfg", {}).get("architecture", kind)
            raise InvalidInput("model", f"vision tower is timm {kind} ({arch}), which is not supported: SITH needs "
                               "a residual stream of one width read by per-head attention (supported timm "
                               f"towers: {', '.join(TIMM_VIT_CLASSES)}, FastVit)")
        super().__init__(model, blocks)

    @staticmethod
    def _fastvit_blocks(trunk: nn.Module) -> list[nn.Module]:
        stages = list(trunk.stages)
        for stage in reversed(stages):
            attn = [b for b in stage.blocks if hasattr(b, "token_mixer") and hasattr(b.token_mixer, "qkv")]
            if attn:
                return attn
        raise InvalidInput("model", "FastVit tower has no attention blocks")

    @property
    def trunk(self) -> nn.Module:
        return self.visual.trunk

    def _readout(self, vectors: Tensor) -> Tensor:
        trunk, head = self.trunk, self.visual.head
        if self.hybrid:
            side = max(1, min(self.visual.image_size) // trunk.feature_info[-1]["reduction"])
            fmap = vectors[:, :, None, None].expand(-1, -1, side, side)
            x = trunk.forward_head(trunk.final_conv(fmap))
        else:
            n = getattr(trunk, "num_prefix_tokens", 1) + 1
            tokens = vectors[:, None, :].expand(-1, n, -1)
            x = trunk.forward_head(trunk.norm(tokens))
        return head(x)

    def joint_pieces(self):
        ref = next(self.trunk.parameters())
        readout = Readout(self._readout, ref)
        return readout, None, self._linear()

    def _final_linears(self) -> list[nn.Linear]:
        out = []
        trunk_head = getattr(self.trunk, "head", None)
        if isinstance(trunk_head, nn.Linear):
            out.append(trunk_head)
        fc = getattr(trunk_head, "fc", None)
        if isinstance(fc, nn.Linear):
            out.append(fc)
        proj = getattr(self.visual.head, "proj", None)
        if isinstance(proj, nn.Linear):
            out.append(proj)
        return out

    def _jacobian_at_zero(self) -> Tensor:
        """[d, D] Jacobian of the (non-linear) readout at the empty stream v = 0: FastViT's linearisation."""
        ref = next(self.trunk.parameters())
        zero = torch.zeros(1, self.width, dtype=ref.dtype, device=ref.device)
        if ref.device.type == "meta":  # shapes only
            return torch.empty(self.width, self._readout(zero).shape[-1], dtype=ref.dtype, device=ref.device)
        with torch.enable_grad():
            jac = torch.autograd.functional.jacobian(lambda v: self._readout(v)[0], zero, vectorize=True)
        return jac[:, 0, :].T.detach()  # [D, 1, d] -> [d, D]

    def _linear(self) -> Tensor | None:
        if self.hybrid:
            return self._jacobian_at_zero()
        if getattr(self.visual.head, "mlp", None) is not None:
            return None
        d = self.width
        ref = next(self.trunk.parameters())
        linear = torch.eye(d, dtype=ref.dtype, device=ref.device)
        pool = getattr(self.trunk, "attn_pool", None)
        if pool is not None:
            w_v = pool.kv.weight.detach()[pool.kv.weight.shape[0] // 2 :]
            linear = linear @ w_v.T @ pool.proj.weight.detach().T
        for layer in self._final_linears():
            linear = linear @ layer.weight.detach().T
        return linear

    def pullback_matrix(self) -> Tensor | None:
        if self.hybrid:
            return self._jacobian_at_zero()
        if getattr(self.visual.head, "mlp", None) is not None:
            return None
        trunk = self.trunk
        m = self._gain(trunk.norm, self.width)
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None:
            w_v = pool.kv.weight.detach()[pool.kv.weight.shape[0] // 2 :]
            m = m @ w_v.T @ pool.proj.weight.detach().T
        m = m @ self._gain(getattr(trunk, "fc_norm", None), m.shape[1])
        for layer in self._final_linears():
            m = m @ layer.weight.detach().T
        return m

    def _gain(self, norm: nn.Module | None, dim: int) -> Tensor:
        ref = next(self.trunk.parameters())
        if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
            return torch.diag(norm.weight.detach())
        return torch.eye(dim, dtype=ref.dtype, device=ref.device)

    def _output_linear(self) -> nn.Linear | None:
        """The readout's last layer when it is a Linear: open_clip's ``head.proj``, or timm's own
        classifier head used as the projection when open_clip adds nothing after it."""
        after = [m for name, m in self.visual.head.named_children() if name != "proj" and not isinstance(m, nn.Dropout)]
        if after:  # an MLP or attention-pool head follows: the last layer is not linear
            return None
        linears = self._final_linears()
        return linears[-1] if linears else None

    def output_projection(self) -> Tensor | None:
        last = self._output_linear()
        return None if last is None else last.weight.detach().T

    def set_projection(self, proj: Tensor) -> None:
        self._set_linear_projection(self._output_linear(), proj)

    @torch.no_grad()
    def rewrite_output(self, right: Tensor) -> None:
        super().rewrite_output(right)
        last = self._output_linear()
        if last is not None and last.bias is not None:   # e = xWᵀ + b, so e·T needs b ← b T too
            last.bias.copy_((last.bias.double() @ right.to(last.bias.device).double()).to(last.bias.dtype))
