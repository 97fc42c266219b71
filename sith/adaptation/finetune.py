"""Fine-tuning testbed models on a sub-task, fully or with LoRA, reusing the testbed trainer's parts.

The world's generator gives sub-tasks for free: a ``Distribution`` restricted to one shape group
("round-only"), a filter on colours ("warm-colours"), or captions with a colour renamed to a word
the model never saw ("crimson": red objects are called crimson), or two known words exchanged
("swap-red-blue"). Training reuses ``sith.testbed.train`` (batch stream,
CLIP loss, AdamW groups, warmup+cosine schedule) but starts from a checkpoint instead of a fresh
init. By default only the vision tower trains (text tower and temperature frozen), so base and
fine-tuned models share one text embedding space and the delta analysis compares like with like.

LoRA: W ← W + (α/r)·B A on the vision attention's input weights (open_clip ``in_proj_weight``,
timm's fused ``qkv`` or separate q/k/v, found through the tower adapter) and its output Linear
(A kaiming-uniform, B = 0, as in the authors' ``LinearWithLoRA``), implemented as a
``torch.nn.utils.parametrize`` parametrization, so the stock ``nn.MultiheadAttention`` forward is
untouched; after training the parametrizations are removed with ``leave_parametrized=True``, which
merges the update into the ordinary weights: the result is a stock checkpoint of the same layout.
"""

from __future__ import annotations

import copy
import json
import re
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sith.engine.errors import InvalidInput
from sith.testbed.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_checkpoint
from sith.testbed.factors import ANGULAR_SHAPES, PLURALS, ROUND_SHAPES
from sith.testbed.spurious import DISTRIBUTIONS
from sith.testbed.train import (BatchStream, _identity, _param_groups, build_tokenizer, clip_loss, lr_factor,
                                seed_everything)
from sith.testbed.world import HELDOUT_SEED, NATURAL, Batch, Distribution, make_batch, sample


@dataclass(frozen=True)
class Subtask:
    """A world distribution, optionally filtered by a scene predicate (e.g. a set of colours)."""

    distribution: Distribution
    colours: tuple[str, ...] | None = None  # keep only scenes of these colours
    concepts: tuple[str, ...] = ()  # the words that name the sub-task (task-relevance check)
    rename: tuple[tuple[str, str], ...] = ()  # (old word, new word) in captions: teach a word never seen

    def accepts(self, scene) -> bool:
        return self.colours is None or scene.colour in self.colours

    def caption(self, text: str) -> str:
        """Apply every rename at once, so a pair of renames can swap two words."""
        if not self.rename:
            return text
        mapping = dict(self.rename)
        pattern = r"\b(" + "|".join(re.escape(word) for word in mapping) + r")\b"
        return re.sub(pattern, lambda m: mapping[m.group(1)], text)


def _shape_words(shapes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(w for s in shapes for w in (s, PLURALS[s]))


WARM = ("red", "orange", "pink", "purple")
COOL = ("blue", "green", "yellow", "white")
SUBTASKS: dict[str, Subtask] = {
    **{name: Subtask(dist) for name, dist in DISTRIBUTIONS.items()},
    "round-only": Subtask(Distribution(name="round-only", group="round"), concepts=_shape_words(ROUND_SHAPES) + ("round",)),
    "angular-only": Subtask(Distribution(name="angular-only", group="angular"),
                            concepts=_shape_words(ANGULAR_SHAPES) + ("angular",)),
    "warm-colours": Subtask(NATURAL, colours=WARM, concepts=WARM),
    "cool-colours": Subtask(NATURAL, colours=COOL, concepts=COOL),
    # New colour words: red objects are captioned "crimson" (blue ones "azure"), a token the testbed
    # never saw in training; the frozen text tower embeds it anyway, and the vision tower must learn it.
    "crimson": Subtask(NATURAL, colours=WARM, concepts=("crimson",), rename=(("red", "crimson"),)),
    "azure": Subtask(NATURAL, colours=COOL, concepts=("azure",), rename=(("blue", "azure"),)),
    # Two known words exchanged: red objects are captioned "blue" and blue ones "red". Both words are
    # in every dictionary, so the delta has a known answer that COMP can name.
    "swap-red-blue": Subtask(NATURAL, concepts=("red", "blue"), rename=(("red", "blue"), ("blue", "red"))),
}
NEW_WORDS = ("crimson", "azure")


class SubtaskStream(BatchStream):
    """Batch k = the first ``batch_size`` accepted samples from indices k·B·SCAN onwards (deterministic)."""

    SCAN = 16  # indices reserved per batch slot; enough for a 1-in-4 filter with huge margin

    def __init__(self, subtask: Subtask, seed: int, batch_size: int, steps: int) -> None:
        super().__init__(subtask.distribution, seed, batch_size, steps)
        self.subtask = subtask

    def __getitem__(self, k: int) -> Batch:
        batch = self._batch(k)
        batch.captions = [self.subtask.caption(c) for c in batch.captions]
        return batch

    def _batch(self, k: int) -> Batch:
        if self.subtask.colours is None:
            return super().__getitem__(k)
        start = k * self.batch_size * self.SCAN
        samples = []
        for i in range(start, start + self.batch_size * self.SCAN):
            s = sample(self.dist, self.seed, i)
            if self.subtask.accepts(s.scene):
                samples.append(s)
                if len(samples) == self.batch_size:
                    return make_batch(samples)
        raise RuntimeError(f"sub-task filter accepted only {len(samples)} of {self.batch_size * self.SCAN} samples")


# The documented recipe (docs/adaptation.md; `sith adapt finetune` and the study use it): 100 steps,
# shortened from 240 so that three seeds of every studied run fit a shared 2-core CPU.
DEFAULT_STEPS = 100


@dataclass
class FinetuneConfig:
    subtask: str = "round-only"
    mode: str = "full"  # "full" or "lora"
    steps: int = DEFAULT_STEPS
    batch_size: int = 64
    lr: float = 3e-4  # full; LoRA typically wants ~10x more
    weight_decay: float = 0.0
    warmup_steps: int = 5
    seed: int = 7
    rank: int = 4  # LoRA
    alpha: float = 8.0  # LoRA scale numerator (update = alpha/rank · B A)
    lora_layers: list[int] | None = None  # default: every vision block
    train_text: bool = False
    threads: int = 1
    log_every: int = 10


class LoRA(nn.Module):
    """Parametrization W ↦ W + (α/r)·B A for a weight [out, in] (B starts at zero: identity at init)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.b @ self.a)


def add_lora(model, rank: int, alpha: float, layers: list[int] | None = None) -> list[nn.Parameter]:
    """Attach LoRA to every chosen vision block's query/key/value and output weights, found through
    the tower adapter (open_clip ``in_proj_weight``, timm fused ``qkv`` or separate q/k/v, …);
    return the trainable parameters."""
    from sith.engine.towers import adapter_for

    if rank < 1:
        raise InvalidInput("rank", f"must be >= 1, got {rank}")
    adapter = adapter_for(model)
    chosen = range(adapter.num_layers) if layers is None else layers
    params: list[nn.Parameter] = []
    for i in chosen:
        if not 0 <= i < adapter.num_layers:
            raise InvalidInput("lora_layers", f"layer {i} does not exist (model has {adapter.num_layers} blocks)")
        for module, name in adapter.access(i).attention_weights():
            out_f, in_f = getattr(module, name).shape
            lora = LoRA(out_f, in_f, rank, alpha).to(getattr(module, name).device)
            parametrize.register_parametrization(module, name, lora)
            params += [lora.a, lora.b]
    return params


def merge_lora(model) -> None:
    """Fold every LoRA update into the stock weights (the model becomes plain open_clip again)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def _trainable(model, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    model.requires_grad_(False)
    if cfg.mode == "lora":
        params = add_lora(model, cfg.rank, cfg.alpha, cfg.lora_layers)
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    if cfg.mode != "full":
        raise InvalidInput("mode", f"expected 'full' or 'lora', got {cfg.mode!r}")
    model.visual.requires_grad_(True)
    if cfg.train_text:
        model.requires_grad_(True)
    return _param_groups(model, cfg.weight_decay)


def finetune(
    model,
    model_cfg: dict[str, Any],
    cfg: FinetuneConfig,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of ``model`` (open_clip CLIP) on ``cfg.subtask``; save to ``out_dir`` if given.

    Returns (fine-tuned model in eval mode with LoRA merged, run summary).
    """
    if cfg.subtask not in SUBTASKS:
        raise InvalidInput("subtask", f"unknown sub-task {cfg.subtask!r}", suggestions=sorted(SUBTASKS))
    if not 0 <= cfg.seed < HELDOUT_SEED:
        raise InvalidInput("seed", f"training seeds must lie in [0, {HELDOUT_SEED})")
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise InvalidInput("steps", "needs steps >= 1 and batch_size >= 2")
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model = copy.deepcopy(model).float().train()
    device = next(model.parameters()).device
    groups = _trainable(model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    tokenizer = build_tokenizer(model_cfg)
    stream = SubtaskStream(SUBTASKS[cfg.subtask], cfg.seed, cfg.batch_size, cfg.steps)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, shuffle=False, num_workers=0, collate_fn=_identity)
    trainable = [p for g in groups for p in g["params"]]
    history = []
    started = time.time()
    for step, batch in enumerate(loader):
        image_features = model.encode_image(batch.images.to(device), normalize=True)
        text_features = model.encode_text(tokenizer(batch.captions).to(device), normalize=True)
        loss = clip_loss(image_features, text_features, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            entry = {"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - started, 1)}
            history.append(entry)
            log(json.dumps(entry))
    merge_lora(model)
    model.eval().requires_grad_(False)
    summary = {"config": asdict(cfg), "seconds": round(time.time() - started, 1),
               "trainable_parameters": sum(p.numel() for p in trainable), "history": history}
    if out_dir is not None:
        save_checkpoint(model, model_cfg, out_dir)
        (out_dir / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return model, summary


def finetune_folder(base_dir: Path, out_dir: Path, cfg: FinetuneConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the checkpoint folder ``base_dir`` (open_clip hf-hub layout, or a transformers CLIP
    folder such as testbed-hf-clip, written back in the same format) into ``out_dir``."""
    from sith.engine.models import load_model
    from sith.engine.towers.hf import HF_CONFIG, is_hf_folder

    if is_hf_folder(base_dir):
        model_cfg = {"hf": json.loads((base_dir / HF_CONFIG).read_text(encoding="utf-8"))}
    elif (base_dir / CONFIG_NAME).is_file() and (base_dir / WEIGHTS_NAME).is_file():
        model_cfg = json.loads((base_dir / CONFIG_NAME).read_text(encoding="utf-8"))["model_cfg"]
    else:
        raise InvalidInput("base", f"{base_dir} is not a checkpoint folder ({CONFIG_NAME} + {WEIGHTS_NAME}, or a "
                           f"transformers {HF_CONFIG} + weights)")
    loaded = load_model(str(base_dir))
    _, summary = finetune(loaded.model, model_cfg, cfg, out_dir, log)
    summary["base"] = {"path": str(base_dir), "hash": loaded.hash}
    (out_dir / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
