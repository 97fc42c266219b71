"""Ground-truth evaluation of an open_clip CLIP model (original or edited) on the synthetic world.

Three measurements, all on held-out seeds (``HELDOUT_SEED`` and up, never used for training) and
fully deterministic:

* zero-shot accuracy per factor: each image is classified among the factor's values by cosine
  similarity to prompt embeddings ("a photo of a red object", "a photo of a star", "a photo of
  something on water", ...), averaged over ``TEMPLATES`` like CLIP's prompt ensembles;
* the spurious split: shape group (round vs angular) on the balanced water/land test set, per
  (group, background) cell, their mean and the worst group. The group is predicted two ways:
  ``prompt`` ("a photo of a round shape" vs "... an angular shape", the headline numbers) and
  ``shape`` (10-way shape prompts, mapped to the shape's group);
* image<->text retrieval recall@1/@5 with ``full_caption`` (every factor named).

Rendered held-out images are cached per (set, size), so evaluating many edited variants of one
model costs only the forward passes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sith.engine.errors import InvalidInput
from sith.testbed.captions import full_caption
from sith.testbed.factors import (
    BACKGROUND_PHRASES,
    FACTORS,
    POSITION_PHRASES,
    SHAPES,
    article,
    shape_group,
)
from sith.testbed.spurious import GROUP_CELLS, balanced_test_sample
from sith.testbed.world import HELDOUT_SEED, NATURAL, Batch, make_batch, sample

TEMPLATES: tuple[str, ...] = ("a photo of {}", "an image of {}", "{}")
FACTOR_SEED = HELDOUT_SEED
SPURIOUS_SEED = HELDOUT_SEED + 1
RETRIEVAL_SEED = HELDOUT_SEED + 2


def _count_phrase(value: str) -> str:
    return {"1": "one object", "2": "two objects", "3": "three objects"}[value]


# Factor -> the phrase naming one of its values (filled into TEMPLATES).
CLASS_PHRASES: dict[str, Callable[[str], str]] = {
    "colour": lambda c: f"{article(c)} {c} object",
    "shape": lambda s: f"{article(s)} {s}",
    "background": lambda b: f"something {BACKGROUND_PHRASES[b][0]}",
    "texture": lambda t: f"{article(t)} {t} object",
    "size": lambda s: f"{article(s)} {s} object",
    "count": _count_phrase,
    "position": lambda p: f"an object {POSITION_PHRASES[p]}",
    "group": lambda g: f"{article(g)} {g} shape",
}


def prompts(factor: str) -> list[str]:
    """The class phrases of a factor, in label order (FACTORS[factor])."""
    return [CLASS_PHRASES[factor](value) for value in FACTORS[factor]]


# ----------------------------------------------------------------------------- held-out data


@functools.lru_cache(maxsize=8)
def factor_set(n: int) -> Batch:
    return make_batch([sample(NATURAL, FACTOR_SEED, i) for i in range(n)])


@functools.lru_cache(maxsize=8)
def spurious_set(n: int) -> tuple[Batch, tuple[tuple[str, str], ...]]:
    pairs = [balanced_test_sample(i, SPURIOUS_SEED) for i in range(n)]
    return make_batch([s for s, _ in pairs]), tuple(cell for _, cell in pairs)


@functools.lru_cache(maxsize=8)
def retrieval_set(n: int) -> tuple[Batch, tuple[str, ...]]:
    batch = make_batch([sample(NATURAL, RETRIEVAL_SEED, i) for i in range(n)])
    return batch, tuple(full_caption(s) for s in batch.scenes)


# ----------------------------------------------------------------------------- encoding


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """[N, D] unit image embeddings."""
    device = _device(model)
    out = [model.encode_image(images[i : i + batch_size].to(device), normalize=True).float()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).cpu()


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 500) -> torch.Tensor:
    """[N, D] unit text embeddings."""
    device = _device(model)
    out = [model.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device), normalize=True).float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out).cpu()


def class_embeddings(model, tokenizer, phrases: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """[C, D] prompt-ensemble classifier: mean of unit template embeddings, re-normalised."""
    texts = [t.format(p) for p in phrases for t in templates]
    emb = encode_texts(model, tokenizer, texts).view(len(phrases), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


# ----------------------------------------------------------------------------- metrics


def zero_shot_factors(model, tokenizer, n: int = 2000, image_features: torch.Tensor | None = None) -> dict[str, Any]:
    """Factor -> {"accuracy", "n", "chance", "per_class"} on the natural held-out set."""
    batch = factor_set(n)
    feats = encode_images(model, batch.images) if image_features is None else image_features
    results: dict[str, Any] = {}
    for factor in CLASS_PHRASES:
        labels = batch.labels[factor]
        keep = labels >= 0  # position exists only for single-object images
        pred = (feats[keep] @ class_embeddings(model, tokenizer, prompts(factor)).T).argmax(-1)
        target = labels[keep]
        correct = pred == target
        per_class = {
            value: round(correct[target == i].float().mean().item(), 4)
            for i, value in enumerate(FACTORS[factor]) if (target == i).any()
        }
        results[factor] = {
            "accuracy": round(correct.float().mean().item(), 4),
            "n": int(keep.sum()),
            "chance": round(1.0 / len(FACTORS[factor]), 4),
            "per_class": per_class,
        }
    return results


def _group_report(correct: torch.Tensor, cells: Sequence[tuple[str, str]]) -> dict[str, Any]:
    groups = {}
    for cell in GROUP_CELLS:
        mask = torch.tensor([c == cell for c in cells])
        groups[f"{cell[0]}/{cell[1]}"] = round(correct[mask].float().mean().item(), 4)
    return {
        "groups": groups,
        "mean_accuracy": round(correct.float().mean().item(), 4),
        "worst_group_accuracy": min(groups.values()),
        "worst_group": min(groups, key=groups.get),
    }


def spurious_groups(model, tokenizer, n: int = 1000) -> dict[str, Any]:
    """Round-vs-angular accuracy per (group, background) cell on the balanced water/land set."""
    if n < len(GROUP_CELLS):
        raise InvalidInput("n_spurious", f"needs at least {len(GROUP_CELLS)} images (one per group)")
    batch, cells = spurious_set(n)
    feats = encode_images(model, batch.images)
    target = batch.labels["group"]
    by_prompt = (feats @ class_embeddings(model, tokenizer, prompts("group")).T).argmax(-1)
    shape_pred = (feats @ class_embeddings(model, tokenizer, prompts("shape")).T).argmax(-1)
    group_index = torch.tensor([FACTORS["group"].index(shape_group(s)) for s in SHAPES])
    by_shape = group_index[shape_pred]
    return {
        "n": n,
        "prompt": _group_report(by_prompt == target, cells),
        "shape": _group_report(by_shape == target, cells),
    }


def retrieval(model, tokenizer, n: int = 1000) -> dict[str, float]:
    """Recall@1/@5 for image->text and text->image over n held-out (image, full caption) pairs."""
    batch, captions = retrieval_set(n)
    sims = encode_images(model, batch.images) @ encode_texts(model, tokenizer, captions).T
    truth = torch.arange(n)

    def recall(s: torch.Tensor, k: int) -> float:
        top = s.topk(min(k, n), dim=-1).indices
        return round((top == truth[:, None]).any(-1).float().mean().item(), 4)

    return {"n": n, "image_to_text_r1": recall(sims, 1), "image_to_text_r5": recall(sims, 5),
            "text_to_image_r1": recall(sims.T, 1), "text_to_image_r5": recall(sims.T, 5)}


def evaluate(model, tokenizer, n_factor: int = 2000, n_spurious: int = 1000, n_retrieval: int = 1000) -> dict[str, Any]:
    """All three measurements; `model` is any open_clip CLIP (eval mode is set here)."""
    for name, value in (("n_factor", n_factor), ("n_retrieval", n_retrieval)):
        if value < 1:
            raise InvalidInput(name, "must be at least 1")
    if n_spurious < len(GROUP_CELLS):
        raise InvalidInput("n_spurious", f"needs at least {len(GROUP_CELLS)} images (one per group)")
    model.eval()
    return {
        "zero_shot": zero_shot_factors(model, tokenizer, n_factor),
        "spurious": spurious_groups(model, tokenizer, n_spurious),
        "retrieval": retrieval(model, tokenizer, n_retrieval),
        "protocol": {"templates": list(TEMPLATES), "prompts": {f: prompts(f) for f in CLASS_PHRASES},
                     "seeds": {"factor": FACTOR_SEED, "spurious": SPURIOUS_SEED, "retrieval": RETRIEVAL_SEED}},
    }


def evaluate_folder(folder: Path, out: Path | None = None, **sizes: int) -> dict[str, Any]:
    """Load a checkpoint folder with plain open_clip (no sith loader), evaluate it, write ``out`` if given.

    Nothing is written by default: the shipped checkpoints live inside the installed package.
    """
    from sith.testbed.checkpoint import load_checkpoint

    if not (folder / "open_clip_config.json").is_file():
        raise InvalidInput("checkpoint", f"{folder} is not a testbed checkpoint folder (no open_clip_config.json)")
    model, tokenizer = load_checkpoint(folder)
    result = {"model": folder.name, **evaluate(model, tokenizer, **sizes)}
    if out is not None:
        write_result(result, out)
    return result


def evaluate_reference(ref: str | None, out: Path | None = None, device: str = "cpu", **sizes: int) -> dict[str, Any]:
    """Evaluate any model reference (``sith.engine.models.load_reference``: "testbed-main", a folder, an
    edited model's folder or single file, ...) and write the result to ``out`` if given."""
    from sith.engine.models import load_reference

    loaded = load_reference(ref, device)
    result = {"model": loaded.name, "hash": loaded.hash, **evaluate(loaded.model, loaded.tokenizer, **sizes)}
    if out is not None:
        write_result(result, out)
    return result


def write_result(result: dict[str, Any], out: Path) -> Path:
    """Write an evaluation result as JSON (creating parent folders)."""
    out = Path(out)
    if out.is_dir():
        raise InvalidInput("out", f"{out} is a folder; give a file name such as {out / 'eval.json'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return out


def summary_rows(result: dict[str, Any]) -> list[tuple[str, float]]:
    """(metric, value) pairs for tables: every factor, group metrics, retrieval."""
    rows = [(f"zero-shot {f}", r["accuracy"]) for f, r in result["zero_shot"].items()]
    for how in ("prompt", "shape"):
        s = result["spurious"][how]
        rows += [(f"spurious ({how}) mean", s["mean_accuracy"]), (f"spurious ({how}) worst group", s["worst_group_accuracy"])]
    rows += [(k, v) for k, v in result["retrieval"].items() if k != "n"]
    return rows
