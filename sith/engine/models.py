"""Loading open_clip CLIP models with a ViT vision tower, and their content hash.

One builder serves every source (built-in name, custom config JSON, hf-hub style folder, local
checkpoint) so they all pass the same checks: SITH needs an ``open_clip.model.CLIP`` whose
``visual`` is a ``VisionTransformer`` made of ``nn.MultiheadAttention`` blocks (spec §1.1).
Pretrained *tags* go through ``open_clip.create_model`` because only it knows how to download them.

The vision hash (sha256 over sorted tensor names, dtypes, shapes and fp32 bytes) is the cache key
of every derived artifact: two loads of the same weights share decompositions and codes, whatever
file or name they came from.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import VisionTransformer
from torch import nn

from sith.engine.errors import InvalidInput

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FOLDER_CONFIG = "open_clip_config.json"
FOLDER_WEIGHTS = "open_clip_model.safetensors"
HF_HUB_PREFIX = "hf-hub:"
HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_WEIGHTS = (FOLDER_WEIGHTS, "open_clip_pytorch_model.bin")
TESTBED_DIR = Path(__file__).resolve().parent.parent / "testbed" / "checkpoints" / "testbed-main"


@dataclass(frozen=True)
class VisionInfo:
    layers: int
    heads: int
    width: int
    head_dim: int
    output_dim: int


@dataclass
class LoadedModel:
    model: open_clip.model.CLIP
    tokenizer: Callable
    name: str
    hash: str
    info: VisionInfo
    preprocess: Callable | None


def _state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def vision_hash(model: nn.Module) -> str:
    """sha256 of the vision tower: sorted names, original dtype, shape and fp32 bytes."""
    return _state_hash(getattr(model, "visual", model).state_dict())


def text_hash(model: nn.Module) -> str:
    """Same hash over everything but the vision tower: dictionary embeddings depend on these weights."""
    return _state_hash({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")})


def vision_info(model: open_clip.model.CLIP) -> VisionInfo:
    visual = model.visual
    attn = visual.transformer.resblocks[0].attn
    return VisionInfo(
        layers=len(visual.transformer.resblocks),
        heads=attn.num_heads,
        width=visual.transformer.width,
        head_dim=attn.head_dim,
        output_dim=visual.output_dim,
    )


def uses_quick_gelu(name: str | None, pretrained: str | None) -> bool:
    """open_clip's rule (spec §1.1): OpenAI weights and ``*-quickgelu`` names use QuickGELU."""
    return pretrained == "openai" or "quickgelu" in (name or "").lower()


def check_vit(model: nn.Module, field: str) -> None:
    """Reject towers SITH cannot decompose (ResNets, timm, custom attention, attention pooling)."""
    if not isinstance(model, open_clip.model.CLIP):
        raise InvalidInput(field, f"SITH needs an open_clip CLIP model, got {type(model).__name__}")
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise InvalidInput(field, f"vision tower is {type(visual).__name__}, not a ViT (VisionTransformer)")
    if visual.attn_pool is not None:
        raise InvalidInput(field, "attention-pooled ViT towers are not supported (ln_post/proj act after pooling)")
    for block in visual.transformer.resblocks:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise InvalidInput(field, "vision blocks must use nn.MultiheadAttention (no custom attention blocks)")


def _model_from_config(model_cfg: dict[str, Any], quick_gelu: bool, field: str) -> open_clip.model.CLIP:
    cfg = copy.deepcopy(model_cfg)
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise InvalidInput(field, "not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    if "timm_model_name" in cfg["vision_cfg"] and cfg["vision_cfg"]["timm_model_name"]:
        raise InvalidInput(field, "timm vision towers are not supported; SITH needs an open_clip ViT")
    if isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        raise InvalidInput(field, "vision tower is a ModifiedResNet, not a ViT")
    if cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"] or "multimodal_cfg" in cfg:
        raise InvalidInput(field, "only the plain open_clip CLIP class is supported (no custom/HF text tower, CoCa)")
    if quick_gelu:
        cfg["quick_gelu"] = True
    try:
        model = open_clip.model.CLIP(**cfg)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise InvalidInput(field, f"invalid model config: {exc}") from exc
    check_vit(model, field)
    return model


def _tokenizer_for(model_cfg: dict[str, Any], name: str | None) -> Callable:
    if name is not None:
        return open_clip.get_tokenizer(name)
    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))


def _check_checkpoint(path: str | Path, field: str = "checkpoint") -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise InvalidInput(field, f"unsupported extension {path.suffix!r}; use one of {', '.join(CHECKPOINT_SUFFIXES)}")
    if not path.is_file():
        raise InvalidInput(field, f"file not found: {path}")
    return path


def _load_weights(model: nn.Module, path: Path, field: str) -> None:
    # open_clip.load_checkpoint reads .safetensors with safetensors and everything else with
    # torch.load(weights_only=True), so no pickled code ever runs.
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:  # corrupt file, pickle refused, key/shape mismatch
        raise InvalidInput(field, f"could not load weights from {path.name}: {exc}") from exc


def _finish(
    model: open_clip.model.CLIP,
    tokenizer: Callable,
    label: str,
    preprocess_cfg: dict[str, Any] | None,
    device: str,
) -> LoadedModel:
    if preprocess_cfg is not None:
        merged = merge_preprocess_dict(PreprocessCfg(), preprocess_cfg)
        merged["size"] = model.visual.image_size
        set_model_preprocess_cfg(model, merged)
    pp = getattr(model.visual, "preprocess_cfg", None)
    preprocess = image_transform_v2(PreprocessCfg(**pp), is_train=False) if pp else None
    model = model.float().eval().requires_grad_(False)
    digest = vision_hash(model)
    return LoadedModel(
        model=model.to(device),
        tokenizer=tokenizer,
        name=label,
        hash=digest,
        info=vision_info(model),
        preprocess=preprocess,
    )


def _read_json(path: Path, field: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(field, f"cannot read JSON {path}: {exc}") from exc


def _load_folder(folder: Path, checkpoint: str | Path | None, field: str, device: str) -> LoadedModel:
    """open_clip's hf-hub layout: open_clip_config.json (with "model_cfg") + weights."""
    config_path = folder / FOLDER_CONFIG
    if not config_path.is_file():
        raise InvalidInput(field, f"folder {folder} has no {FOLDER_CONFIG}")
    data = _read_json(config_path, field)
    if "model_cfg" not in data:
        raise InvalidInput(field, f"{config_path} has no 'model_cfg' key (open_clip hf-hub layout)")
    model_cfg = data["model_cfg"]
    model = _model_from_config(model_cfg, quick_gelu=False, field=field)
    if checkpoint is not None:
        _load_weights(model, _check_checkpoint(checkpoint), "checkpoint")
    else:
        weights = folder / FOLDER_WEIGHTS
        if not weights.is_file():
            found = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
            if not found:
                raise InvalidInput(field, f"folder {folder} has no {FOLDER_WEIGHTS}")
            weights = found[0]
        _load_weights(model, weights, field)
    tokenizer = _tokenizer_for(model_cfg, None)
    return _finish(model, tokenizer, folder.name, data.get("preprocess_cfg", {}), device)


def _load_hub(name: str, checkpoint: str | Path | None, device: str) -> LoadedModel:
    """``hf-hub:ORG/REPO[@REVISION]``: fetch the repo's open_clip folder files, then load it as a folder.

    huggingface_hub's own cache and settings apply (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, tokens),
    so a machine without network loads repos already in its cache.
    """
    repo, _, revision = name[len(HF_HUB_PREFIX):].partition("@")
    if not HF_REPO.fullmatch(repo):
        raise InvalidInput("name", f"expected hf-hub:ORG/REPO[@REVISION], got {name!r}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo, revision=revision or None, allow_patterns=[FOLDER_CONFIG, *HUB_WEIGHTS])
    except Exception as exc:  # offline and not cached, unknown repo, no access
        raise InvalidInput("name", f"could not fetch {name} from the Hugging Face Hub: {exc}") from exc
    loaded = _load_folder(Path(folder), checkpoint, "name", device)
    return dataclasses.replace(loaded, name=name)


def _load_config_file(path: Path, checkpoint: str | Path | None, device: str) -> LoadedModel:
    if path.suffix.lower() != ".json":
        raise InvalidInput("config", f"expected a .json model config or a folder, got {path.name!r}")
    data = _read_json(path, "config")
    model_cfg = data.get("model_cfg", data)
    model = _model_from_config(model_cfg, quick_gelu=False, field="config")
    if checkpoint is not None:
        _load_weights(model, _check_checkpoint(checkpoint), "checkpoint")
    label = Path(checkpoint).stem if checkpoint is not None else path.stem
    return _finish(model, _tokenizer_for(model_cfg, None), label, data.get("preprocess_cfg", {}), device)


def _load_named(name: str, pretrained: str | None, checkpoint: str | Path | None, device: str) -> LoadedModel:
    canonical = name.replace("/", "-")
    model_cfg = open_clip.get_model_config(canonical)
    if model_cfg is None:
        close = difflib.get_close_matches(canonical, open_clip.list_models(), n=5, cutoff=0.5)
        raise InvalidInput("name", f"unknown open_clip model {name!r}", suggestions=close)
    quick_gelu = uses_quick_gelu(canonical, pretrained)
    if pretrained is not None and not Path(pretrained).expanduser().is_file():
        tags = open_clip.list_pretrained_tags_by_model(canonical)
        if pretrained not in tags:
            close = difflib.get_close_matches(pretrained, tags, n=5, cutoff=0.3) or tags[:5]
            raise InvalidInput("pretrained", f"unknown tag {pretrained!r} for {canonical}", suggestions=close)
        _model_from_config(model_cfg, quick_gelu, "name")  # reject non-ViT before downloading
        try:
            model = open_clip.create_model(canonical, pretrained=pretrained, force_quick_gelu=quick_gelu)
        except Exception as exc:  # no network, corrupt download
            raise InvalidInput("pretrained", f"could not fetch {canonical}/{pretrained}: {exc}") from exc
        check_vit(model, "name")
        return _finish(model, open_clip.get_tokenizer(canonical), f"{canonical}/{pretrained}", None, device)
    if pretrained is not None:  # open_clip also accepts a file path as `pretrained`
        checkpoint, pretrained = pretrained, None
    model = _model_from_config(model_cfg, quick_gelu, "name")
    label = canonical
    if checkpoint is not None:
        path = _check_checkpoint(checkpoint)
        _load_weights(model, path, "checkpoint")
        label = f"{canonical}/{path.stem}"
    return _finish(model, open_clip.get_tokenizer(canonical), label, {}, device)


def load_model(
    name: str | None = None,
    pretrained: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load a CLIP ViT in eval mode, fp32, from one of these sources:

    * ``name`` (+ ``pretrained`` tag, or ``checkpoint`` file): an open_clip built-in config;
      without weights the model is randomly initialised (tests, benchmarks);
    * ``config``: an open_clip model-config JSON (as ``model_configs/*.json``, or wrapped in
      ``{"model_cfg": ...}``) plus an optional ``checkpoint``; or a folder in open_clip's hf-hub
      layout (``open_clip_config.json`` + ``open_clip_model.safetensors``). ``name`` may also be
      such a folder;
    * ``name`` = ``hf-hub:ORG/REPO[@REVISION]``: that Hub repo's open_clip folder (through
      huggingface_hub and its cache);
    * nothing: the embedded testbed model (``default_model``).
    """
    if checkpoint is not None:
        _check_checkpoint(checkpoint)
    if config is not None:
        path = Path(config).expanduser()
        if not path.exists():
            raise InvalidInput("config", f"not found: {path}")
        if path.is_dir():
            return _load_folder(path, checkpoint, "config", device)
        return _load_config_file(path, checkpoint, device)
    if name is None:
        if checkpoint is not None:
            raise InvalidInput("name", "a checkpoint needs a model name or config describing its architecture")
        return default_model(device)
    if name.startswith(HF_HUB_PREFIX):
        return _load_hub(name, checkpoint, device)
    if Path(name).expanduser().is_dir():
        return _load_folder(Path(name).expanduser(), checkpoint, "name", device)
    if name.lower().endswith(".json") and Path(name).expanduser().is_file():
        return _load_config_file(Path(name).expanduser(), checkpoint, device)
    return _load_named(name, pretrained, checkpoint, device)


def load_reference(ref: str | None, device: str = "cpu") -> LoadedModel:
    """A model named by one string, the same everywhere (CLI arguments, ``SITH_MODELS``, job payloads).

    "" or "default": the embedded testbed model; a shipped testbed name ("testbed-small"); a
    folder or a config JSON path; ``hf-hub:ORG/REPO[@REVISION]``; an open_clip ``name`` or
    ``name/pretrained`` (a tag or a weights file).
    """
    text = (ref or "").strip()
    if text in ("", "default"):
        return default_model(device)
    shipped = TESTBED_DIR.parent / text
    if "/" not in text and (shipped / FOLDER_CONFIG).is_file():
        return load_model(str(shipped), device=device)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_model(str(path), device=device)
    if path.is_file():
        return load_model(config=path, device=device)
    if text.startswith(HF_HUB_PREFIX) or "/" not in text:
        return load_model(text, device=device)
    name, pretrained = text.split("/", 1)
    return load_model(name, pretrained, device=device)


def default_model(device: str = "cpu") -> LoadedModel:
    """The embedded testbed model shipped in ``sith/testbed/checkpoints/testbed-main``."""
    if not (TESTBED_DIR / FOLDER_CONFIG).is_file() or not (TESTBED_DIR / FOLDER_WEIGHTS).is_file():
        raise InvalidInput(
            "model",
            f"the embedded testbed model is not installed (expected {FOLDER_CONFIG} and "
            f"{FOLDER_WEIGHTS} in {TESTBED_DIR}); pass a model name, config or checkpoint instead",
        )
    return _load_folder(TESTBED_DIR, None, "model", device)
