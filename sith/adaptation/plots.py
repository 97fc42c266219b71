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
    "right_cos_median": "principal cos: median, band min–max",
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
    """Layers × heads grid. Cell colour = the share of the head's whole profile (distractors
    included) held by its dominant category, on a colour scale with a colour bar; cell border =
    which category (legend); text = the head's strongest concept, category and share."""
    shares = np.asarray(shares, dtype=float)
    if shares.shape != (len(heads), len(categories)):
        raise InvalidInput("shares", f"expected [{len(heads)}, {len(categories)}], got {list(shares.shape)}")
    layers = sorted({layer for layer, _ in heads})
    n_heads = max(h for _, h in heads) + 1
    palette = plt.get_cmap("tab10").colors
    grid = np.full((len(layers), n_heads), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * n_heads + 3.5, 0.7 * len(layers) + 1.5))
    cells = []
    for (layer, head), row, concept in zip(heads, shares, top_concepts):
        y = layers.index(layer)
        c = int(np.argmax(row))
        grid[y, head] = float(row[c])
        cells.append((head, y, c, concept, float(row[c])))
    image = ax.imshow(grid, cmap="YlGnBu", vmin=0.0, vmax=1.0, aspect="auto")
    for x, y, c, concept, share in cells:
        ax.add_patch(plt.Rectangle((x - 0.46, y - 0.44), 0.92, 0.88, fill=False,
                                   edgecolor=palette[c % len(palette)], linewidth=2.5))
        ax.text(x, y, f"{concept}\n{categories[c]} {share:.0%}", ha="center", va="center", fontsize=7,
                color="white" if share > 0.6 else "black")
    ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)])
    ax.set_yticks(range(len(layers)), [f"L{layer}" for layer in layers])
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="dominant category's share of the profile")
    handles = [plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor=palette[i % len(palette)], linewidth=2.5)
               for i in range(len(categories))]
    ax.legend(handles, categories, loc="upper left", bbox_to_anchor=(1.25, 1), fontsize=8, title="category (border)")
    ax.set_title(title)
    return fig


def base_order(before: LayerSVD, after: LayerSVD) -> np.ndarray:
    """[H, r] σ_after re-indexed by the base vector each after-vector matches (Hungarian on |cos| of the
    right vectors), so σ_after[h, j] belongs to base vector j: a suppressed vector stays at its own
    index instead of moving to the end of a re-sorted spectrum."""
    from scipy.optimize import linear_sum_assignment

    vb, va = before.V.double(), after.V.double()
    cos = (vb.transpose(1, 2) @ va).abs().numpy()  # [H, r_b, r_a]
    s_after = after.S.double().numpy()
    out = np.zeros(before.S.shape)
    for h in range(cos.shape[0]):
        rows, cols = linear_sum_assignment(-cos[h])
        out[h, rows] = s_after[h, cols]
    return out


def plot_spectra(before: Mapping[int, LayerSVD], after: Mapping[int, LayerSVD], layer: int,
                 heads: Sequence[int] | None = None, labels: tuple[str, str] = ("before", "after"),
                 title: str | None = None) -> Figure:
    """σ spectra of a layer's heads before and after an edit or a fine-tune (one panel per head),
    both plotted by *base* index j (``base_order``): nothing is re-sorted."""
    if layer not in before or layer not in after:
        raise InvalidInput("layer", f"layer {layer} is not in both decompositions")
    s0 = before[layer].S.float().numpy()
    s1 = base_order(before[layer], after[layer])
    heads = list(range(s0.shape[0])) if heads is None else list(heads)
    floor = 1e-3 * float(max(s0.max(), s1.max()))
    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.4), squeeze=False, sharey=True)
    for ax, head in zip(axes.flat, heads):
        ax.semilogy(s0[head], "o-", ms=3, label=labels[0])
        ax.semilogy(np.maximum(s1[head], floor), "s--", ms=3, label=labels[1])  # removed vectors sit on the floor
        ax.set_title(f"L{layer} H{head}", fontsize=9)
        ax.set_xlabel("base vector index j")
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("σ_j")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title or f"σ spectra, layer {layer}: {labels[0]} vs {labels[1]} (by base index)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_stability(runs: Mapping[str, Sequence[Mapping[str, float]]],
                   metrics: Mapping[str, str] = STABILITY_METRICS, base: str | None = None,
                   title: str | None = None) -> Figure:
    """Per-layer stability figures (``stability.layer_stability`` rows), one line per run; the
    principal-angle panel shows the median with a band from the minimum to the maximum cosine."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.3), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics.items()):
        for run, rows in runs.items():
            x = [r["layer"] for r in rows]
            if key == "right_cos_median" and all("right_cos_min" in r for r in rows):
                line, = ax.plot(x, [r[key] for r in rows], "o-", label=run)
                ax.fill_between(x, [r["right_cos_min"] for r in rows], [r["right_cos_max"] for r in rows],
                                color=line.get_color(), alpha=0.15)
            else:
                ax.plot(x, [r[key] for r in rows], "o-", label=run)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title or ("Basis stability" + (f" of fine-tunes of {base}" if base else "")), fontsize=10)
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
                 pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]], names: tuple[str, str] = ("A", "B"),
                 title: str | None = None) -> Figure:
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
    ax.set_title(title or f"Head profile cosine: {names[0]} vs {names[1]}", fontsize=9)
    return fig


def plot_universality(rows: Sequence[Mapping]) -> Figure:
    """Matched mean minus its concept-usage-preserving chance level for every model pair (bars; the
    whisker is 2 null standard deviations), coloured by the kind of pair, with the p-values."""
    kinds = {"trained": "tab:blue", "control": "tab:grey", "untrained-untrained": "tab:red"}
    fig, ax = plt.subplots(figsize=(0.55 * len(rows) + 2.5, 3.8))
    x = np.arange(len(rows))
    for i, r in enumerate(rows):
        colour = kinds.get(r["kind"], "tab:purple")
        if r["kind"] == "trained" and not r.get("same_architecture", True):
            colour = "tab:green"
        ax.bar(i, r["excess"], color=colour, yerr=2 * r["null_std"], capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{r['a']}\n{r['b']}\np = {r['p_value']:.3f}" for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("matched mean − chance")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:green", "tab:grey", "tab:red")]
    ax.legend(handles, ["trained, same architecture", "trained, across architectures", "vs untrained tower",
                        "untrained vs untrained"], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("Head matching above the concept-usage-preserving chance level", fontsize=9)
    fig.tight_layout()
    return fig
