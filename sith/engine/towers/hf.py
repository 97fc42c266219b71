"""Hugging Face ``transformers`` CLIP, SigLIP and SigLIP2 checkpoints (config.json + model.safetensors).

``HFModel`` wraps a ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` with the few methods the engine calls on a CLIP
(``encode_image``, ``encode_text``, ``visual``), while its ``state_dict`` is the transformers one,
so an edited model is written back as a folder ``from_pretrained`` loads (same keys, same config).
``transformers`` is an optional dependency (``pip install sith[hf]``) imported only here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sith.engine.errors import InvalidInput
from sith.engine.towers.base import Readout, TowerAdapter

HF_CONFIG = "config.json"
HF_CONFIG_KEY = "transformers_config"  # safetensors metadata of a single-file transformers export
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "spiece.model",
                   "special_tokens_map.json", "preprocessor_config.json")


def transformers_module():
    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise InvalidInput("model", "Hugging Face checkpoints need the optional 'transformers' package: "
                           "pip install 'sith[hf]'") from exc
    return transformers


def is_hf_folder(folder: Path) -> bool:
    return (folder / HF_CONFIG).is_file() and not (folder / "open_clip_config.json").is_file()


class HFModel(nn.Module):
    """A transformers CLIP/SigLIP/SigLIP2 model behind open_clip's ``encode_image``/``encode_text`` calls.

    SigLIP2 takes NaFlex inputs (patch rows, a patch mask, each image's patch grid); ``encode_image``
    turns a [B, 3, H, W] batch (square or not) into them the way its image processor does, so every sith
    path that holds pixel tensors works unchanged. Its square size is √num_patches · patch_size."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        vision = hf.config.vision_config
        size = getattr(vision, "image_size", None) or int(round(vision.num_patches ** 0.5)) * vision.patch_size
        hf.vision_model.image_size = (size, size)  # what open_clip towers expose as visual.image_size

    @property
    def visual(self) -> nn.Module:
        return self.hf.vision_model

    @property
    def model_type(self) -> str:
        return self.hf.config.model_type

    @property
    def logit_scale(self) -> nn.Parameter:
        """The contrastive temperature (log), where open_clip's CLIP keeps it (the testbed trainer)."""
        return self.hf.logit_scale

    @staticmethod
    def _features(out) -> Tensor:
        if isinstance(out, Tensor):
            return out
        return out.pooler_output

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        if self.model_type == "siglip2":
            x = self._features(self.hf.get_image_features(**naflex_inputs(images, self.hf.config.vision_config.patch_size)))
        else:
            x = self._features(self.hf.get_image_features(pixel_values=images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        x = self._features(self.hf.get_text_features(input_ids=tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: Tensor | None = None, tokens: Tensor | None = None):
        image = self.encode_image(images, normalize=True) if images is not None else None
        text = self.encode_text(tokens, normalize=True) if tokens is not None else None
        return image, text

    # the checkpoint is the transformers model's own state dict (no "hf." prefix)
    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.hf.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.hf.load_state_dict(state_dict, strict=strict, assign=assign)

    def sith_export(self, out: Path, metadata: dict[str, str]) -> Path:
        """Write the model in transformers' own format (``sith.edits.export`` calls this).

        A folder (``from_pretrained`` loads it): config.json + model.safetensors (+ sith_manifest.json).
        A single ``X.safetensors``: the same weights, with the transformers config in the metadata
        under ``transformers_config`` (``sith`` loads it alone; ``unpack_hf`` makes the folder).
        """
        from safetensors.torch import save_file

        out = Path(out)
        state = {k: v.detach().cpu().contiguous() for k, v in self.hf.state_dict().items()}
        config_text = self.hf.config.to_json_string()
        if out.suffix == ".safetensors":
            out.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out), metadata={"format": "pt", HF_CONFIG_KEY: config_text, **metadata})
            return out
        if out.exists() and not out.is_dir():
            raise InvalidInput("output", f"{out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / HF_WEIGHTS[0]), metadata={"format": "pt", **metadata})
        (out / HF_CONFIG).write_text(config_text, encoding="utf-8")
        for key, text in metadata.items():
            if key == "sith.manifest":
                (out / "sith_manifest.json").write_text(json.dumps(json.loads(text), indent=2) + "\n", encoding="utf-8")
        return out


def naflex_inputs(images: Tensor, patch: int) -> dict[str, Tensor]:
    """SigLIP2's inputs for a [B, C, H, W] batch: patch rows [B, N, p·p·C] (row-major patches, each
    flattened channels-last, as Siglip2ImageProcessor does), an all-ones mask and the (H/p, W/p) grid."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise InvalidInput("images", f"SigLIP2 needs sides divisible by its patch size {patch}, got {h}x{w}")
    rows = (images.reshape(b, c, h // patch, patch, w // patch, patch)
            .permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c))
    return {"pixel_values": rows,
            "pixel_attention_mask": torch.ones(rows.shape[:2], dtype=torch.long, device=images.device),
            "spatial_shapes": torch.tensor([[h // patch, w // patch]] * b, dtype=torch.long, device=images.device)}


class HFTower(TowerAdapter):
    """``CLIPModel`` (post_layernorm + visual_projection) or ``SiglipModel`` / ``Siglip2Model`` (post_layernorm
    + MAP head)."""

    def __init__(self, model: HFModel) -> None:
        self.family = f"hf-{model.model_type}"
        vision = model.hf.vision_model
        super().__init__(model, list(vision.encoder.layers))
        self.head = getattr(vision, "head", None) if getattr(vision, "use_head", True) else None
        if self.head is not None:
            self.joint_note = ("constant-sequence readout through the MAP head (post_layernorm, probe attention, "
                               "layernorm + MLP): exact for that input, non-linear; inverse uses the linear part")
        elif model.model_type in ("siglip", "siglip2"):
            self.joint_note = "no pooling head: readout is post_layernorm(v)"

    @property
    def visual(self) -> nn.Module:
        return self.model.hf.vision_model

    def _readout(self, vectors: Tensor) -> Tensor:
        x = self.visual.post_layernorm(vectors)
        return self.head(x[:, None, :]) if self.head is not None else x

    def joint_pieces(self):
        vision = self.visual
        proj_module = getattr(self.model.hf, "visual_projection", None)
        proj = proj_module.weight.detach().T if proj_module is not None else None
        if self.head is None:
            return vision.post_layernorm, proj, proj
        attn = self.head.attention
        d = attn.embed_dim
        linear = attn.in_proj_weight.detach()[2 * d : 3 * d].T @ attn.out_proj.weight.detach().T
        return Readout(self._readout, vision.post_layernorm.weight), None, linear

    def pullback_matrix(self) -> Tensor:
        _, _, linear = self.joint_pieces()  # visual_projection (CLIP) or the MAP head's V·out (SigLIP)
        gain = torch.diag(self.visual.post_layernorm.weight.detach())
        return gain @ linear if linear is not None else gain

    def set_projection(self, proj: Tensor) -> None:
        self._set_linear_projection(getattr(self.model.hf, "visual_projection", None), proj)

    def vision_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.model.hf.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}

    def text_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.model.hf.state_dict().items()
                if not k.startswith(("vision_model.", "visual_projection."))}


# ---------------------------------------------------------------------------------------- loading

def read_hf_config(folder: Path, field: str) -> dict[str, Any]:
    try:
        data = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(field, f"cannot read {folder / HF_CONFIG}: {exc}") from exc
    kind = data.get("model_type")
    if kind not in HF_TYPES:
        raise InvalidInput(field, f"Hugging Face model_type {kind!r} is not supported (supported: "
                           f"{', '.join(sorted(HF_TYPES))}; architectures {data.get('architectures')})")
    return data


def build_hf(config: dict[str, Any] | Any, field: str = "config") -> HFModel:
    """A randomly initialised transformers model from a config dict or object (tests, coverage)."""
    tf = transformers_module()
    if isinstance(config, dict):
        kind = config.get("model_type")
        if kind not in HF_TYPES:
            raise InvalidInput(field, f"Hugging Face model_type {kind!r} is not supported")
        config = getattr(tf, HF_TYPES[kind].replace("Model", "Config")).from_dict(config)
    cls = getattr(tf, HF_TYPES[config.model_type])
    return HFModel(cls(config).eval())


def load_hf_folder(folder: Path, checkpoint: Path | None, field: str) -> HFModel:
    """from_pretrained on a local folder (no network), or config + an explicit weights file."""
    data = read_hf_config(folder, field)
    tf = transformers_module()
    cls = getattr(tf, HF_TYPES[data["model_type"]])
    try:
        if checkpoint is None:
            if not any((folder / name).is_file() for name in HF_WEIGHTS):
                raise InvalidInput(field, f"folder {folder} has no {' or '.join(HF_WEIGHTS)}")
            hf = cls.from_pretrained(str(folder), local_files_only=True)
        else:
            hf = cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(field, f"could not load the Hugging Face model in {folder}: {exc}") from exc
    model = HFModel(hf.eval())
    if checkpoint is not None:
        from safetensors.torch import load_file

        try:
            state = (load_file(str(checkpoint)) if checkpoint.suffix == ".safetensors"
                     else torch.load(checkpoint, map_location="cpu", weights_only=True))
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise InvalidInput("checkpoint", f"could not load weights from {checkpoint.name}: {exc}") from exc
    return model


class LazyTokenizer:
    """Builds the tokenizer on first use, so decompose/edit never need tokenizer files or packages."""

    def __init__(self, build: Callable[[], Callable]) -> None:
        self._build = build
        self._tokenizer: Callable | None = None

    def __call__(self, texts, *args, **kwargs):
        if self._tokenizer is None:
            self._tokenizer = self._build()
        return self._tokenizer(texts, *args, **kwargs)


def hf_tokenizer(folder: Path | None, model: HFModel) -> Callable:
    """The folder's tokenizer (ids padded to the text context); CLIP without files: open_clip's BPE (same vocabulary)."""
    text_cfg = model.hf.config.text_config
    context = int(getattr(text_cfg, "max_position_embeddings", 77))

    def build() -> Callable:
        has_files = folder is not None and any((folder / n).is_file() for n in TOKENIZER_FILES[:5])
        if has_files:
            tf = transformers_module()
            tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

            def encode(texts):
                out = tok(list(texts), padding="max_length", truncation=True, max_length=context, return_tensors="pt")
                return out["input_ids"]
            return encode
        if model.model_type == "clip" and getattr(text_cfg, "vocab_size", 0) == 49408:
            import open_clip

            return open_clip.SimpleTokenizer(context_length=context)
        raise InvalidInput("model", f"no tokenizer files in {folder} for this {model.model_type} model; "
                           "text encoding (dictionaries) needs them")

    return LazyTokenizer(build)


def hf_preprocess_cfg(folder: Path | None, model: HFModel) -> dict[str, Any]:
    """open_clip preprocess settings from preprocessor_config.json (or the family's defaults)."""
    size = model.hf.vision_model.image_size[0]
    if model.model_type == "clip":
        cfg: dict[str, Any] = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}
    else:
        cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash"}
    path = folder / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            cfg["mean"] = tuple(data.get("image_mean", cfg["mean"]))
            cfg["std"] = tuple(data.get("image_std", cfg["std"]))
        except (OSError, json.JSONDecodeError):
            pass
    cfg["size"] = size
    return cfg


def build_hf_from_text(config_text: str, field: str) -> HFModel:
    """A model from a transformers config JSON string (a single-file export's metadata)."""
    try:
        data = json.loads(config_text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(field, f"bad {HF_CONFIG_KEY} metadata: {exc}") from exc
    return build_hf(data, field)
