"""Loading CLIP-style models (open_clip, or Hugging Face transformers folders), and their content hash.

One builder serves every source (built-in name, custom config JSON, hf-hub style folder, local
checkpoint, transformers folder) so they all pass the same check: the model must have a tower
adapter (``sith.engine.towers.adapter_for``: open_clip ViT incl. CoCa/CLIPA, timm ViT/EVA/PE/FastViT
towers inside open_clip, transformers CLIP/SigLIP). Unsupported towers are rejected from a model
built on the meta device, so a big ConvNeXt is refused without allocating it. Pretrained *tags* go
through ``open_clip.create_model`` because only it knows how to download them. Tokenizers are built
on first use (``LazyTokenizer``), so decomposing or editing never needs tokenizer packages or files.

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
from torch import nn

from sith.engine.errors import InvalidInput
from sith.engine.towers import adapter_for
from sith.engine.towers.hf import (
    HF_CONFIG,
    HF_CONFIG_KEY,
    HF_WEIGHTS,
    LazyTokenizer,
    build_hf_from_text,
    hf_preprocess_cfg,
    hf_tokenizer,
    is_hf_folder,
    load_hf_folder,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FOLDER_CONFIG = "open_clip_config.json"
FOLDER_WEIGHTS = "open_clip_model.safetensors"
HF_HUB_PREFIX = "hf-hub:"
HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_WEIGHTS = (FOLDER_WEIGHTS, "open_clip_pytorch_model.bin")
# a transformers repo: its config, weights, tokenizer and preprocessing files
HUB_HF_FILES = (HF_CONFIG, *HF_WEIGHTS, "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                "spiece.model", "special_tokens_map.json", "preprocessor_config.json")
# safetensors metadata key under which a single-file export carries its open_clip_config.json
EMBEDDED_CONFIG_KEY = "open_clip_config"
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
    # {"model_cfg", "preprocess_cfg"} the model was built from: what an exported copy (an edit)
    # writes as its open_clip_config.json. None when unknown (a model built elsewhere).
    config: dict[str, Any] | None = None


def _state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())  # buffer, no bytes copy
    return digest.hexdigest()


def vision_hash(model: nn.Module) -> str:
    """sha256 of the vision tower: sorted names, original dtype, shape and fp32 bytes."""
    return _state_hash(adapter_for(model).vision_state())


def text_hash(model: nn.Module) -> str:
    """Same hash over everything but the vision tower: dictionary embeddings depend on these weights."""
    return _state_hash(adapter_for(model).text_state())


def vision_info(model: nn.Module) -> VisionInfo:
    tower = adapter_for(model)
    return VisionInfo(
        layers=tower.num_layers,
        heads=tower.num_heads,
        width=tower.width,
        head_dim=tower.head_dim,
        output_dim=tower.output_dim,
    )


def uses_quick_gelu(name: str | None, pretrained: str | None) -> bool:
    """open_clip's rule (spec §1.1): OpenAI weights and ``*-quickgelu`` names use QuickGELU."""
    return pretrained == "openai" or "quickgelu" in (name or "").lower()


def check_vit(model: nn.Module, field: str) -> None:
    """Reject towers SITH cannot decompose: InvalidInput(field) naming the tower type (ResNet, ConvNeXt, ...)."""
    adapter_for(model, field)


def _clip_class(cfg: dict[str, Any]) -> type:
    """open_clip's own rule (factory.create_model): CoCa, CustomTextCLIP (custom/HF text tower) or CLIP."""
    if "multimodal_cfg" in cfg:
        return open_clip.model.CoCa if hasattr(open_clip.model, "CoCa") else open_clip.coca_model.CoCa
    if cfg.get("custom_text") or cfg["text_cfg"].get("hf_model_name"):
        return open_clip.model.CustomTextCLIP
    return open_clip.model.CLIP


def _construct(cfg: dict[str, Any], field: str, device: str | torch.device | None = None) -> nn.Module:
    cls = _clip_class(cfg)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    try:
        if device is None:
            return cls(**kwargs)
        with torch.device(device):
            return cls(**kwargs)
    except InvalidInput:
        raise
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise InvalidInput(field, f"invalid model config: {exc}") from exc
    except (ImportError, OSError, RuntimeError) as exc:  # HF text towers need transformers + a cached config
        raise InvalidInput(field, f"cannot build this model here: {type(exc).__name__}: {exc}") from exc


def _checked_config(model_cfg: dict[str, Any], quick_gelu: bool, field: str,
                    keep: list[nn.Module] | None = None) -> dict[str, Any]:
    """The config to build, after rejecting unsupported towers on the meta device (nothing allocated)."""
    cfg = copy.deepcopy(model_cfg)
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise InvalidInput(field, "not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    if isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        raise InvalidInput(field, "vision tower is a ModifiedResNet, not a ViT")
    if cfg["vision_cfg"].get("timm_model_name"):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # weights come from the checkpoint, never a download
    if quick_gelu:
        cfg["quick_gelu"] = True
    skeleton = _construct(cfg, field, "meta")
    check_vit(skeleton, field)  # reject unsupported towers without allocating them
    if keep is not None:  # the caller loads weights into it (_model_from_config(meta=True))
        keep.append(skeleton)
    return cfg


def _model_from_config(model_cfg: dict[str, Any], quick_gelu: bool, field: str, meta: bool = False) -> nn.Module:
    """The model for ``model_cfg``; ``meta=True``: on the meta device (no memory, no random init),
    for ``_load_weights`` to fill from a checkpoint."""
    skeletons: list[nn.Module] = []
    cfg = _checked_config(model_cfg, quick_gelu, field, keep=skeletons)
    if not meta:
        return _construct(cfg, field)
    model = skeletons[0]
    model._sith_cfg = cfg  # for _materialize_buffers' fallback (buffers it cannot rebuild)
    return model


def _tokenizer_for(model_cfg: dict[str, Any], name: str | None) -> Callable:
    """The model's tokenizer, built on first call (CLIPA/HF text towers need transformers only then)."""
    if name is not None:
        return LazyTokenizer(lambda: open_clip.get_tokenizer(name))
    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        return LazyTokenizer(lambda: open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                                                     context_length=context_length))
    return LazyTokenizer(lambda: open_clip.SimpleTokenizer(context_length=context_length,
                                                           **text_cfg.get("tokenizer_kwargs", {})))


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
        if any(p.is_meta for p in model.parameters()):
            _assign_checkpoint(model, path)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:  # corrupt file, pickle refused, key/shape mismatch
        raise InvalidInput(field, f"could not load weights from {path.name}: {exc}") from exc


def _assign_checkpoint(model: nn.Module, path: Path) -> None:
    """Fill a meta-device model from ``path``: the file's tensors become its parameters.

    open_clip.load_checkpoint does the format work (key conversions, position-embedding resizes);
    its final ``load_state_dict`` runs with ``assign=True``, so nothing is randomly initialised and
    then overwritten, and the weights are held once. safetensors maps the file, so those tensors are
    cloned into owned memory first: a model must not crash (SIGBUS) when its file is rewritten.
    Non-persistent buffers (the text tower's causal mask) are rebuilt afterwards.
    """
    owned = path.suffix.lower() == ".safetensors"

    def assign(state_dict, strict: bool = True, assign: bool = False):
        if owned:
            state_dict = {name: tensor.clone() for name, tensor in state_dict.items()}
        return type(model).load_state_dict(model, state_dict, strict=strict, assign=True)

    model.load_state_dict = assign  # instance attribute: shadows the method for this one call
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    finally:
        del model.load_state_dict
    _materialize_buffers(model)
    model.__dict__.pop("_sith_cfg", None)


def _materialize_buffers(model: nn.Module) -> None:
    """Rebuild buffers still on the meta device after a state-dict assignment (not in checkpoints)."""
    missing = [(name, module) for module in model.modules() for name, buf in module.named_buffers(recurse=False)
               if buf.is_meta]
    if not missing:
        return
    twin = None
    for name, module in missing:
        if name == "attn_mask" and hasattr(module, "build_causal_mask"):  # open_clip TextTransformer
            with torch.device("cpu"):
                module.register_buffer(name, module.build_causal_mask(), persistent=False)
            continue
        if name == "attn_mask" and isinstance(module, open_clip.model.CLIP):  # its text tower's causal mask
            size = module.attn_mask.shape[0]
            module.register_buffer(name, torch.full((size, size), float("-inf")).triu_(1), persistent=False)
            continue
        if twin is None:  # a buffer only its constructor knows: build one ordinary copy to take it from
            twin = dict(_construct(model._sith_cfg, "model").named_modules())
        owner = next(n for n, m in model.named_modules() if m is module)
        module.register_buffer(name, twin[owner].get_buffer(name), persistent=False)


def _finish(
    model: open_clip.model.CLIP,
    tokenizer: Callable,
    label: str,
    preprocess_cfg: dict[str, Any] | None,
    device: str,
    model_cfg: dict[str, Any] | None = None,
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
        config=None if model_cfg is None else {"model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": dict(pp or {})},
    )


def _read_json(path: Path, field: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(field, f"cannot read JSON {path}: {exc}") from exc


def _load_hf(folder: Path, checkpoint: str | Path | None, field: str, device: str) -> LoadedModel:
    """A transformers CLIPModel/SiglipModel folder (config.json + model.safetensors), loaded locally."""
    path = _check_checkpoint(checkpoint) if checkpoint is not None else None
    model = load_hf_folder(folder, path, field)
    label = folder.name if path is None else f"{folder.name}/{path.stem}"
    return _finish(model, hf_tokenizer(folder, model), label, hf_preprocess_cfg(folder, model), device)


def _load_folder(folder: Path, checkpoint: str | Path | None, field: str, device: str) -> LoadedModel:
    """open_clip's hf-hub layout: open_clip_config.json (with "model_cfg") + weights; or a transformers folder."""
    config_path = folder / FOLDER_CONFIG
    if is_hf_folder(folder):
        return _load_hf(folder, checkpoint, field, device)
    if not config_path.is_file():
        raise InvalidInput(field, f"folder {folder} has no {FOLDER_CONFIG} (open_clip) or {HF_CONFIG} (transformers)")
    data = _read_json(config_path, field)
    if "model_cfg" not in data:
        raise InvalidInput(field, f"{config_path} has no 'model_cfg' key (open_clip hf-hub layout)")
    model_cfg = data["model_cfg"]
    model = _model_from_config(model_cfg, quick_gelu=False, field=field, meta=True)
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
    return _finish(model, tokenizer, folder.name, data.get("preprocess_cfg", {}), device, model_cfg)


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

        folder = snapshot_download(repo, revision=revision or None, allow_patterns=[FOLDER_CONFIG, *HUB_WEIGHTS, *HUB_HF_FILES])
    except Exception as exc:  # offline and not cached, unknown repo, no access
        raise InvalidInput("name", f"could not fetch {name} from the Hugging Face Hub: {exc}") from exc
    loaded = _load_folder(Path(folder), checkpoint, "name", device)
    return dataclasses.replace(loaded, name=name)


def _load_config_file(path: Path, checkpoint: str | Path | None, device: str) -> LoadedModel:
    if path.suffix.lower() != ".json":
        raise InvalidInput("config", f"expected a .json model config or a folder, got {path.name!r}")
    data = _read_json(path, "config")
    if "model_type" in data and "model_cfg" not in data:  # a transformers config.json: load its folder
        return _load_hf(path.parent, checkpoint, "config", device)
    model_cfg = data.get("model_cfg", data)
    model = _model_from_config(model_cfg, quick_gelu=False, field="config", meta=checkpoint is not None)
    if checkpoint is not None:
        _load_weights(model, _check_checkpoint(checkpoint), "checkpoint")
    label = Path(checkpoint).stem if checkpoint is not None else path.stem
    return _finish(model, _tokenizer_for(model_cfg, None), label, data.get("preprocess_cfg", {}), device, model_cfg)


def _embedded_hf_config(path: str | Path) -> str | None:
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(HF_CONFIG_KEY)
    except Exception:  # not a safetensors file
        return None


def embedded_config(path: str | Path) -> dict[str, Any] | None:
    """The open_clip config a single .safetensors file carries in its metadata (sith exports), or None."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(EMBEDDED_CONFIG_KEY)
        return None if text is None else json.loads(text)
    except Exception:  # not a safetensors file, or bad JSON: treated as carrying no config
        return None


def _load_embedded(path: Path, device: str) -> LoadedModel:
    hf_text = _embedded_hf_config(path)
    if hf_text is not None:  # a single-file transformers export (sith.engine.towers.hf)
        model = build_hf_from_text(hf_text, "checkpoint")
        try:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(path)), strict=True)
        except Exception as exc:
            raise InvalidInput("checkpoint", f"could not load weights from {path.name}: {exc}") from exc
        return _finish(model, hf_tokenizer(None, model), path.stem, hf_preprocess_cfg(None, model), device)
    data = embedded_config(path)
    if data is None or "model_cfg" not in data:
        raise InvalidInput("checkpoint", f"{path.name} does not say which architecture it holds (no "
                           f"'{EMBEDDED_CONFIG_KEY}' metadata); give a model name or config with it")
    model = _model_from_config(data["model_cfg"], quick_gelu=False, field="checkpoint", meta=True)
    _load_weights(model, path, "checkpoint")
    return _finish(model, _tokenizer_for(data["model_cfg"], None), path.stem, data.get("preprocess_cfg", {}),
                   device, data["model_cfg"])


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
        _checked_config(model_cfg, quick_gelu, "name")  # reject unsupported towers before downloading
        try:
            model = open_clip.create_model(canonical, pretrained=pretrained, force_quick_gelu=quick_gelu)
        except Exception as exc:  # no network, corrupt download
            raise InvalidInput("pretrained", f"could not fetch {canonical}/{pretrained}: {exc}") from exc
        check_vit(model, "name")
        return _finish(model, _tokenizer_for(model_cfg, canonical), f"{canonical}/{pretrained}", None, device,
                       {**model_cfg, "quick_gelu": True} if quick_gelu else model_cfg)
    if pretrained is not None:  # open_clip also accepts a file path as `pretrained`
        checkpoint, pretrained = pretrained, None
    model = _model_from_config(model_cfg, quick_gelu, "name", meta=checkpoint is not None)
    label = canonical
    if checkpoint is not None:
        path = _check_checkpoint(checkpoint)
        _load_weights(model, path, "checkpoint")
        label = f"{canonical}/{path.stem}"
    return _finish(model, _tokenizer_for(model_cfg, canonical), label, {}, device,
                   {**model_cfg, "quick_gelu": True} if quick_gelu else model_cfg)


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
            if embedded_config(checkpoint) is None and _embedded_hf_config(checkpoint) is None:
                raise InvalidInput("name", "a checkpoint needs a model name or config describing its architecture")
            return _load_embedded(Path(checkpoint).expanduser(), device)
        return default_model(device)
    if name.startswith(HF_HUB_PREFIX):
        return _load_hub(name, checkpoint, device)
    if Path(name).expanduser().is_dir():
        return _load_folder(Path(name).expanduser(), checkpoint, "name", device)
    if name.lower().endswith(".json") and Path(name).expanduser().is_file():
        return _load_config_file(Path(name).expanduser(), checkpoint, device)
    return _load_named(name, pretrained, checkpoint, device)


def is_checkpoint_folder(folder: Path) -> bool:
    """An open_clip folder (open_clip_config.json) or a transformers one (config.json, e.g. testbed-hf-clip)."""
    return (folder / FOLDER_CONFIG).is_file() or is_hf_folder(folder)


def shipped_folder(name: str | None) -> Path | None:
    """The shipped checkpoint folder called ``name`` ("testbed-main", "testbed-hf-clip", ...), if any."""
    if not name or "/" in name or name.startswith("."):
        return None
    folder = TESTBED_DIR.parent / name
    return folder if is_checkpoint_folder(folder) else None


def load_reference(ref: str | None, device: str = "cpu") -> LoadedModel:
    """A model named by one string, the same everywhere (CLI arguments, ``SITH_MODELS``, job payloads).

    "" or "default": the embedded testbed model; a shipped testbed name ("testbed-small"); a
    folder or a config JSON path; a .safetensors file that carries its config (sith exports); ``hf-hub:ORG/REPO[@REVISION]``; an open_clip ``name`` or
    ``name/pretrained`` (a tag or a weights file).
    """
    text = (ref or "").strip()
    if text in ("", "default"):
        return default_model(device)
    shipped = shipped_folder(text)
    if shipped is not None:
        return load_model(str(shipped), device=device)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_model(str(path), device=device)
    if path.is_file():
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:  # a single file that carries its config
            return load_model(checkpoint=path, device=device)
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
