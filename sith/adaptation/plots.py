"""Figures for adaptation and universality, drawn with matplotlib's Agg backend (no display needed).

Every ``plot_*`` returns the Figure; ``save`` writes it as PNG and SVG side by side, the formats
docs and dashboards embed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sith.engine.decomposition import LayerSVD  # noqa: E402
from sith.engine.errors import InvalidInput  # noqa: E402

FORMATS = ("png", "svg")
STABILITY_METRICS = {
    "right_subspace_cos": "right subspace (mean principal cos)",
    "weighted_matched_cos": "matched |cos| (σ-weighted)",
    "diagonal_dominance": "diagonal dominance",
    "sigma_ratio_median": "median σ_ft / σ_base",
}


def save(fig: Figure, stem: str | Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg``; return both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def plot_themes(heads: Sequence[tuple[int, int]], shares: np.ndarray, categories: Sequence[str],
                top_concepts: Sequence[str], title: str = "Head themes") -> Figure:
    """Layers × heads grid: colour = the category with most profile mass, shade = its share of the
    head's whole profile (distractors included), text = the head's strongest concept."""
    shares = np.asarray(shares, dtype=float)
    if shares.shape != (len(heads), len(categories)):
        raise InvalidInput("shares", f"expected [{len(heads)}, {len(categories)}], got {list(shares.shape)}")
    layers = sorted({layer for layer, _ in heads})
    n_heads = max(h for _, h in heads) + 1
    palette = plt.get_cmap("tab10").colors
    rgba = np.ones((len(layers), n_heads, 4))
    fig, ax = plt.subplots(figsize=(1.2 * n_heads + 2.5, 0.7 * len(layers) + 1.5))
    for (layer, head), row, concept in zip(heads, shares, top_concepts):
        y = layers.index(layer)
        c = int(np.argmax(row))
        share = float(row[c])
        colour = np.array(palette[c % len(palette)])
        rgba[y, head, :3] = 1 - share * (1 - colour)  # blend towards white when the share is small
        ax.text(head, y, f"{concept}\n{categories[c]} {share:.0%}", ha="center", va="center", fontsize=7)
    ax.imshow(rgba, aspect="auto")
    ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)])
    ax.set_yticks(range(len(layers)), [f"L{layer}" for layer in layers])
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i % len(palette)]) for i in range(len(categories))]
    ax.legend(handles, categories, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="category")
    ax.set_title(title)
    return fig


def plot_spectra(before: Mapping[int, LayerSVD], after: Mapping[int, LayerSVD], layer: int,
                 heads: Sequence[int] | None = None, labels: tuple[str, str] = ("before", "after")) -> Figure:
    """σ spectra of a layer's heads before and after an edit or a fine-tune (one panel per head)."""
    if layer not in before or layer not in after:
        raise InvalidInput("layer", f"layer {layer} is not in both decompositions")
    s0, s1 = before[layer].S.float().numpy(), after[layer].S.float().numpy()
    heads = list(range(s0.shape[0])) if heads is None else list(heads)
    floor = 1e-3 * float(max(s0.max(), s1.max()))
    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, head in zip(axes.flat, heads):
        ax.semilogy(s0[head], "o-", ms=3, label=labels[0])
        ax.semilogy(np.maximum(s1[head], floor), "s--", ms=3, label=labels[1])  # removed vectors sit on the floor
        ax.set_title(f"L{layer} H{head}", fontsize=9)
        ax.set_xlabel("index j")
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("σ_j")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_stability(runs: Mapping[str, Sequence[Mapping[str, float]]],
                   metrics: Mapping[str, str] = STABILITY_METRICS) -> Figure:
    """Per-layer stability figures (``stability.layer_stability`` rows), one line per run."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics.items()):
        for run, rows in runs.items():
            ax.plot([r["layer"] for r in rows], [r[key] for r in rows], "o-", label=run)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_delta_norms(runs: Mapping[str, Sequence[tuple[int, int, float]]]) -> Figure:
    """Relative change ‖ΔW‖/‖W‖ per (layer, head), one bar group per run."""
    fig, ax = plt.subplots(figsize=(8, 3))
    width = 0.8 / max(1, len(runs))
    for i, (run, items) in enumerate(runs.items()):
        x = np.arange(len(items))
        ax.bar(x + i * width, [v for _, _, v in items], width, label=run)
        ax.set_xticks(x + 0.4 - width / 2, [f"L{layer}H{h}" for layer, h, _ in items], rotation=90, fontsize=7)
    ax.set_ylabel("‖ΔW_VO‖ / ‖W_VO‖")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_matches(similarity: np.ndarray, heads_a: Sequence[tuple[int, int]], heads_b: Sequence[tuple[int, int]],
                 pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]], names: tuple[str, str] = ("A", "B")) -> Figure:
    """Profile cosine similarity of every head pair, with the Hungarian matches circled."""
    similarity = np.asarray(similarity, dtype=float)
    fig, ax = plt.subplots(figsize=(0.3 * len(heads_b) + 2.5, 0.3 * len(heads_a) + 1.5))
    image = ax.imshow(similarity, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ia = {h: i for i, h in enumerate(heads_a)}
    ib = {h: i for i, h in enumerate(heads_b)}
    for a, b in pairs:
        ax.scatter(ib[b], ia[a], s=40, facecolors="none", edgecolors="red", linewidths=1.2)
    ax.set_xticks(range(len(heads_b)), [f"L{layer}H{h}" for layer, h in heads_b], rotation=90, fontsize=7)
    ax.set_yticks(range(len(heads_a)), [f"L{layer}H{h}" for layer, h in heads_a], fontsize=7)
    ax.set_xlabel(names[1])
    ax.set_ylabel(names[0])
    fig.colorbar(image, ax=ax, label="profile cosine")
    return fig
