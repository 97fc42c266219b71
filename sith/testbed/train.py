"""Contrastive training of small open_clip CLIP models on the synthetic world.

Batches are generated on the fly (batch ``k`` = samples ``k*B .. k*B+B-1`` of the training
stream), so there is no dataset on disk and a run is reproducible from its preset alone:
fixed seeds, AdamW with open_clip's weight-decay exclusions, linear warmup then cosine decay,
symmetric cross-entropy with a learnable temperature clamped at 100 (as in CLIP).

A preset may run several *stages* (each a fresh optimiser and schedule on the same weights) and
add an auxiliary factor-label loss: linear heads on the image embedding that are discarded when
the checkpoint is saved. A small ViT trained contrastively on this world learns colour and
background at once but shape barely at all (docs/testbed.md); a label warm-up plus the auxiliary
loss is what makes shape reach the embedding, after which zero-shot prompts can find it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sith.engine.errors import InvalidInput
from sith.testbed.checkpoint import CHECKPOINT_DIR, WEIGHTS_NAME, save_checkpoint
from sith.testbed.factors import FACTORS as LABELLED
from sith.testbed.spurious import distribution
from sith.testbed.world import HELDOUT_SEED, Batch, Distribution, Sample, make_batch, on_background, sample

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SHAREABLE: tuple[str, ...] = ("colour", "texture", "size", "count")


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    distribution: str = "main-mix"
    num_workers: int = 0  # data-generation processes (0 = inline)
    threads: int = 2  # torch CPU threads; 1 is faster when the CPU is shared with other jobs
    grad_clip: float = 1.0
    log_every: int = 25
    save_every: int = 0  # also save the checkpoint every N steps (0 = only at the end)
    hard_negatives: int = 1  # group size k: each k consecutive samples share the `shared` factors
    shared: tuple[str, ...] = ("colour",)  # factors a hard-negative group shares besides its background
    init_from: str | None = None  # start from this checkpoint folder (a name under checkpoints/ or a path)
    contrastive_weight: float = 1.0  # 0 = a label-only warm-up stage (the text tower is not run)
    label_loss: dict[str, float] = field(default_factory=dict)  # factor -> weight of its auxiliary label loss
    single_large: float = 0.0  # share of training scenes forced to one large object (see Distribution)
    position_init: str = ""  # "sincos2d": start a timm tower's learnt pos_embed at 2-D sin-cos (first stage only)
    tower_init: str = ""  # "open_clip": start a timm ViT / transformers CLIP tower at open_clip's ViT init (first stage only)


@dataclass
class Preset:
    name: str
    model_cfg: dict[str, Any]
    train: TrainConfig
    stages: list[TrainConfig] = field(default_factory=list)  # empty = one stage, `train`

    def stage_configs(self) -> list[TrainConfig]:
        return self.stages or [self.train]


def list_presets() -> list[str]:
    return sorted(p.stem.removeprefix("testbed-") for p in CONFIG_DIR.glob("testbed-*.json"))


def load_preset(name: str) -> Preset:
    """`main` or `testbed-main` -> configs/testbed-main.json; a path to a JSON file also works."""
    path = Path(name)
    if not path.suffix == ".json":
        path = CONFIG_DIR / f"testbed-{name.removeprefix('testbed-')}.json"
    if not path.is_file():
        raise InvalidInput("preset", f"no preset {name!r}", suggestions=list_presets())
    data = json.loads(path.read_text(encoding="utf-8"))

    def config(fields: dict[str, Any], base: TrainConfig, where: str) -> TrainConfig:
        try:
            return replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        except TypeError as exc:
            raise InvalidInput(where, str(exc)) from exc

    train = config(data.get("train", {}), TrainConfig(), "preset.train")
    stages = [config(s, train, f"preset.stages[{i}]") for i, s in enumerate(data.get("stages", []))]
    return Preset(name=data.get("name", path.stem), model_cfg=data["model_cfg"], train=train, stages=stages)


def build_model(model_cfg: dict[str, Any]) -> open_clip.model.CLIP:
    """CLIP, or CustomTextCLIP for a timm/custom tower (``custom_text``, e.g. testbed-siglip, testbed-timm),
    or a transformers CLIPModel behind open_clip's calls (``hf``: a transformers config dict)."""
    import sith.engine.towers  # noqa: F401  (registers the testbed's timm towers)

    if "hf" in model_cfg:
        from sith.engine.towers.hf import build_hf

        return build_hf(model_cfg["hf"], "preset.model_cfg.hf").train()

    cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    return (open_clip.model.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.model.CLIP)(**cfg)


POSITION_INITS = ("", "sincos2d")


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """[rows·cols, dim] fixed 2-D sin-cos position code (a quarter of the channels each for sin/cos of
    row and column, frequencies 1/10000^(i/(dim/4))): every token has norm sqrt(dim/2)."""
    if dim % 4:
        raise InvalidInput("train.position_init", f"sincos2d needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    parts = [f(axis.reshape(-1, 1) * omega) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def init_positions(model: torch.nn.Module, how: str) -> None:
    """Re-initialise a timm tower's position embedding (``how`` in POSITION_INITS; "" keeps timm's).

    timm starts ``pos_embed`` at N(0, 0.02²) and has no norm before the blocks, so on the testbed's
    64 px images the position code stayed at about 1% of a patch token's norm. The sin-cos start
    gives every token a position signal of norm sqrt(width/2); the embedding stays learnable. (It
    did not make testbed-siglip learn shape: docs/towers.md.)
    """
    if how not in POSITION_INITS:
        raise InvalidInput("train.position_init", f"unknown {how!r}", suggestions=list(POSITION_INITS[1:]))
    if not how:
        return
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    pos = getattr(trunk, "pos_embed", None)
    if pos is None:
        raise InvalidInput("train.position_init", "only a timm vision tower with a learnt pos_embed can be re-initialised")
    prefix = 0 if getattr(trunk, "no_embed_class", False) else getattr(trunk, "num_prefix_tokens", 0)
    code = sincos_2d(tuple(trunk.patch_embed.grid_size), pos.shape[-1])
    with torch.no_grad():
        pos.zero_()
        pos[0, prefix:] = code.to(pos.dtype)


TOWER_INITS = ("", "open_clip")


def init_tower(model: torch.nn.Module, how: str) -> None:
    """Re-initialise a timm ViT or transformers CLIP tower (``how`` in TOWER_INITS; "" keeps its own init).

    "open_clip" gives it the start open_clip's own ViT has: position embedding and class token
    N(0, 1/width), fused qkv Xavier-uniform, the other block Linears PyTorch's default, qkv and
    attention-output biases zero. timm starts every Linear at N(0, 0.02²), the position embedding at
    N(0, 0.02²) and the class token at N(0, (1e-6)²). In label-only shape runs on the same batches
    this start, with the pre-norm of the testbed-timm tower, closed most of the gap to testbed-small's
    open_clip ViT (docs/towers.md). The MAP head (if any) keeps timm's init.
    """
    if how not in TOWER_INITS:
        raise InvalidInput("train.tower_init", f"unknown {how!r}", suggestions=list(TOWER_INITS[1:]))
    if not how:
        return
    if hasattr(model, "sith_export"):  # a transformers CLIP (sith.engine.towers.hf.HFModel)
        _open_clip_init_hf(model.visual)
        return
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if getattr(trunk, "pos_embed", None) is None or not hasattr(trunk, "blocks"):
        raise InvalidInput("train.tower_init", "only a timm ViT or transformers CLIP vision tower can be re-initialised")
    scale = trunk.pos_embed.shape[-1] ** -0.5
    with torch.no_grad():
        trunk.pos_embed.normal_(0, scale)
        if getattr(trunk, "cls_token", None) is not None:
            trunk.cls_token.normal_(0, scale)
    for name, module in trunk.blocks.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.endswith("attn.qkv"):
            torch.nn.init.xavier_uniform_(module.weight)
        else:
            module.reset_parameters()
        if module.bias is not None and name.endswith(("attn.qkv", "attn.proj")):
            torch.nn.init.zeros_(module.bias)


def _open_clip_init_hf(vision: torch.nn.Module) -> None:
    """open_clip's ViT start for a transformers CLIP vision tower (see ``init_tower``): class and
    position embeddings N(0, 1/width); q, k, v each drawn like their rows of open_clip's fused
    Xavier-uniform in_proj (bound √(6 / (d + 3d))), their biases and out_proj's zero; the other
    Linears and the patch convolution at PyTorch's default."""
    embeddings = vision.embeddings
    width = embeddings.class_embedding.shape[-1]
    bound = math.sqrt(6.0 / (width + 3 * width))
    with torch.no_grad():
        embeddings.class_embedding.normal_(0, width ** -0.5)
        embeddings.position_embedding.weight.normal_(0, width ** -0.5)
        embeddings.patch_embedding.reset_parameters()
        for name, module in vision.encoder.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if name.endswith(("q_proj", "k_proj", "v_proj")):
                module.weight.uniform_(-bound, bound)
            else:
                module.reset_parameters()
            if module.bias is not None and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                module.bias.zero_()


def build_tokenizer(model_cfg: dict[str, Any]) -> open_clip.SimpleTokenizer:
    """open_clip's BPE at the text tower's context (a transformers CLIP text tower has the same vocabulary)."""
    if "hf" in model_cfg:
        return open_clip.SimpleTokenizer(context_length=model_cfg["hf"]["text_config"]["max_position_embeddings"])
    return open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77))


class BatchStream(torch.utils.data.Dataset):
    """Item k = training batch k; a Dataset so DataLoader workers can generate batches in parallel."""

    def __init__(
        self, dist: Distribution, seed: int, batch_size: int, steps: int, group: int = 1,
        shared: tuple[str, ...] = ("colour",),
    ) -> None:
        if group < 1 or batch_size % group:
            raise InvalidInput("train.hard_negatives", "must be >= 1 and divide batch_size")
        unknown = set(shared) - set(SHAREABLE)
        if unknown:
            raise InvalidInput("train.shared", f"cannot share {sorted(unknown)}", suggestions=list(SHAREABLE))
        self.dist, self.seed, self.batch_size, self.steps, self.group = dist, seed, batch_size, steps, group
        self.shared = tuple(shared)

    def __len__(self) -> int:
        return self.steps

    def _group(self, anchor_index: int) -> list[Sample]:
        """An anchor sample plus group-1 scenes on its background in its colour.

        With random batches, background and colour alone tell almost every in-batch pair apart,
        so the loss barely rewards shape, texture, size or count; these hard negatives do.
        """
        anchor = sample(self.dist, self.seed, anchor_index)
        same_bg = on_background(self.dist, anchor.scene.background)
        fields = self.shared + (("position",) if "count" in self.shared else ())  # position exists iff count == 1
        overrides = {f: getattr(anchor.scene, f) for f in fields}
        members = [sample(same_bg, self.seed, anchor_index + j, **overrides) for j in range(1, self.group)]
        return [anchor, *members]

    def __getitem__(self, k: int) -> Batch:
        start = k * self.batch_size
        if self.group == 1:
            return make_batch([sample(self.dist, self.seed, i) for i in range(start, start + self.batch_size)])
        return make_batch([s for g in range(start, start + self.batch_size, self.group) for s in self._group(g)])


def _load_initial_weights(model: torch.nn.Module, init_from: str) -> None:
    """Continue from a saved checkpoint (a second training stage with a fresh schedule and data seed)."""
    folder = Path(init_from) if Path(init_from).is_dir() else CHECKPOINT_DIR / init_from
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InvalidInput("train.init_from", f"no {WEIGHTS_NAME} in {folder}")
    state = load_file(str(weights))
    model.load_state_dict({k: v.float() for k, v in state.items()})


def _identity(batch: Batch) -> Batch:
    return batch


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no decay on gains, biases, embeddings and the logit scale (timm's ``pos_embed``
    is a position embedding too)."""
    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name or "positional" in name or "class_embedding" in name or "pos_embed" in name \
            or "cls_token" in name
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not exclude(n, p)]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and exclude(n, p)]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (features already normalised)."""
    logits = logit_scale.exp() * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


class LabelHeads(torch.nn.Module):
    """Linear factor classifiers on the (unnormalised) image embedding; never saved with the model."""

    def __init__(self, embed_dim: int, factors: list[str]) -> None:
        super().__init__()
        unknown = sorted(set(factors) - set(LABELLED))
        if unknown:
            raise InvalidInput("train.label_loss", f"no labels for {unknown}", suggestions=list(LABELLED))
        self.heads = torch.nn.ModuleDict({f: torch.nn.Linear(embed_dim, len(LABELLED[f])) for f in factors})

    def losses(self, embedding: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy per factor (label -1, e.g. position in a multi-object scene, is ignored)."""
        return {f: F.cross_entropy(head(embedding), labels[f].to(embedding.device), ignore_index=-1)
                for f, head in self.heads.items()}


def _check_stage(cfg: TrainConfig, where: str) -> None:
    if not 0 <= cfg.seed < HELDOUT_SEED:
        raise InvalidInput(f"{where}.seed", f"training seeds must lie in [0, {HELDOUT_SEED}) (held-out seeds above)")
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise InvalidInput(where, "needs steps >= 1 and batch_size >= 2")
    if cfg.contrastive_weight < 0 or any(w < 0 for w in cfg.label_loss.values()):
        raise InvalidInput(where, "loss weights must be >= 0")
    if cfg.contrastive_weight == 0 and not any(cfg.label_loss.values()):
        raise InvalidInput(where, "a stage needs a contrastive or a label loss")


def train(
    preset: Preset,
    out_dir: Path | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `preset` (all its stages), save it to `out_dir` (default checkpoints/<name>), return the run summary."""
    stages = preset.stage_configs()
    for i, cfg in enumerate(stages):
        _check_stage(cfg, f"stages[{i}]" if preset.stages else "train")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(stages[0].seed)
    model = build_model(preset.model_cfg)
    init_tower(model, stages[0].tower_init)
    init_positions(model, stages[0].position_init)
    if stages[0].init_from:
        _load_initial_weights(model, stages[0].init_from)
    model = model.to(device).train()
    factors = sorted({f for cfg in stages for f, w in cfg.label_loss.items() if w > 0})
    heads = LabelHeads(preset.model_cfg["embed_dim"], factors).to(device) if factors else None
    folder = out_dir or CHECKPOINT_DIR / preset.name

    history: list[dict[str, Any]] = []
    started = time.time()
    for index, cfg in enumerate(stages):
        _run_stage(model, heads, preset, cfg, index, folder, device, history, log, started)
    seconds = time.time() - started

    model.eval()
    dtype = save_checkpoint(model, preset.model_cfg, folder)
    summary = {
        "name": preset.name,
        "train": asdict(preset.train),
        **({"stages": [asdict(cfg) for cfg in preset.stages]} if preset.stages else {}),
        "device": device,
        "train_seconds": round(seconds, 1),
        "samples_seen": sum(cfg.steps * cfg.batch_size for cfg in stages),
        "final_loss": history[-1]["loss"],
        "stored_dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    (folder / "train.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _run_stage(
    model: open_clip.model.CLIP,
    heads: LabelHeads | None,
    preset: Preset,
    cfg: TrainConfig,
    stage: int,
    folder: Path,
    device: str,
    history: list[dict[str, Any]],
    log: Callable[[str], None],
    started: float,
) -> None:
    """One stage: a fresh AdamW + warmup/cosine schedule and its own data stream on the shared weights."""
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer(preset.model_cfg)
    trained = [model] + ([heads] if heads is not None else [])
    groups = [g for m in trained for g in _param_groups(m, cfg.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    dist = distribution(cfg.distribution)
    if cfg.single_large:
        dist = replace(dist, name=f"{dist.name}+large{cfg.single_large:g}", single_large=cfg.single_large)
    stream = BatchStream(dist, cfg.seed, cfg.batch_size, cfg.steps, cfg.hard_negatives, tuple(cfg.shared))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, shuffle=False, num_workers=cfg.num_workers, collate_fn=_identity
    )
    weights = {f: w for f, w in cfg.label_loss.items() if w > 0}
    for step, batch in enumerate(loader):
        embedding = model.encode_image(batch.images.to(device, non_blocking=True))
        terms: dict[str, torch.Tensor] = {}
        if cfg.contrastive_weight:
            text_features = model.encode_text(tokenizer(batch.captions).to(device), normalize=True)
            terms["contrastive"] = clip_loss(F.normalize(embedding, dim=-1), text_features, model.logit_scale)
        if weights:
            label_losses = heads.losses(embedding, batch.labels)
            terms.update({f"label_{f}": label_losses[f] for f in weights})
        loss = cfg.contrastive_weight * terms.get("contrastive", 0.0) + sum(
            w * terms[f"label_{f}"] for f, w in weights.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in trained for p in m.parameters()], cfg.grad_clip)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            entry = {"stage": stage, "step": step, "loss": round(loss.item(), 4), "lr": schedule.get_last_lr()[0],
                     **{k: round(v.item(), 4) for k, v in terms.items()},
                     "temperature": round(model.logit_scale.exp().item(), 2),
                     "elapsed_s": round(time.time() - started, 1)}
            history.append(entry)
            log(json.dumps(entry))
        if cfg.save_every and step and step % cfg.save_every == 0:
            save_checkpoint(model, preset.model_cfg, folder)
