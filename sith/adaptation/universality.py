"""Cross-model head matching by what heads encode (spec §8: the same specialised heads recur).

Two models with different width, depth, seed and joint space share nothing geometric, so heads are
compared through words: each model codes its own singular vectors over its *own* embedding of one
shared vocabulary, and a head's **concept profile** is the σ·coefficient-weighted histogram of its
COMP concepts, p_c = Σ_j σ_j coef_{j,c} / Σ_j σ_j — the Analyzer's theme score, kept for every
concept. Profiles of model A's heads and model B's heads are compared by cosine similarity and
paired by Hungarian matching (maximum total similarity, one-to-one). A pair's match score is its
cosine; ``mutual`` marks pairs that are each other's best match in both directions, which is what
separates a real shared specialisation from a forced assignment.

With named concept categories (e.g. the testbed's factors), each head also gets a specialisation:
the category holding the largest share of its in-category profile mass, if that share is at least
``SPECIALISED_SHARE``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sith.engine.analysis import Analyzer
from sith.engine.decomposition import resolve_layers
from sith.engine.errors import InvalidInput
from sith.engine.sparse import DEFAULT_COHERENCE, DEFAULT_K

SPECIALISED_SHARE = 0.5


@dataclass
class HeadProfiles:
    heads: list[tuple[int, int]]  # (layer, head) per row
    profiles: Tensor  # [n_heads, N] over the shared vocabulary
    concepts: list[str]


def head_profiles(analyzer: Analyzer, layers: int | Sequence[int] | None = None, method: str = "comp",
                  k: int = DEFAULT_K, coherence: float = DEFAULT_COHERENCE) -> HeadProfiles:
    """Concept profile of every head of the chosen layers (default the last four)."""
    n = len(analyzer.dictionary.concepts)
    heads, rows = [], []
    for layer in resolve_layers(analyzer.loaded.info, layers):
        svd = analyzer.decomposition([layer])[layer]
        codes = analyzer.codes(layer, method, k, coherence)
        num_heads, rank = svd.S.shape
        dense = codes.to("cpu").dense(n).reshape(num_heads, rank, n)
        sigma = svd.S.float()
        profile = (sigma[:, :, None] * dense).sum(1) / sigma.sum(1, keepdim=True).clamp_min(1e-12)
        heads += [(layer, h) for h in range(num_heads)]
        rows.append(profile)
    return HeadProfiles(heads=heads, profiles=torch.cat(rows), concepts=list(analyzer.dictionary.concepts))


def category_shares(profiles: HeadProfiles, categories: Mapping[str, Sequence[str]]) -> tuple[list[str], Tensor]:
    """Share of each head's profile mass per category [n_heads, C] (concepts outside every category
    count in the total only)."""
    names = list(categories)
    index = {c: i for i, c in enumerate(profiles.concepts)}
    member = torch.zeros(len(profiles.concepts), len(names))
    for j, name in enumerate(names):
        for concept in categories[name]:
            if concept in index:
                member[index[concept], j] = 1.0
    mass = profiles.profiles @ member
    total = profiles.profiles.sum(1, keepdim=True).clamp_min(1e-12)
    return names, mass / total


def specialisation(shares: Tensor, names: list[str], threshold: float = SPECIALISED_SHARE) -> list[str | None]:
    """Per head, the category holding at least ``threshold`` of the mass that falls in *any* category.

    Renormalising over the categories ignores distractor concepts, which soak up a similar share
    of every head's profile and would otherwise hide a clear preference among the named factors.
    """
    shares = shares / shares.sum(dim=1, keepdim=True).clamp_min(1e-12)
    best, arg = shares.max(dim=1)
    return [names[int(a)] if float(b) >= threshold else None for b, a in zip(best, arg)]


@dataclass
class HeadMatch:
    a: tuple[int, int]  # (layer, head) in model A
    b: tuple[int, int]
    score: float  # cosine of the two profiles
    mutual: bool  # each is the other's best match
    category_a: str | None = None
    category_b: str | None = None
    top_concepts: list[str] | None = None  # concepts both profiles weigh most (product of the two)


def match_profiles(a: HeadProfiles, b: HeadProfiles, categories: Mapping[str, Sequence[str]] | None = None,
                   shared_top: int = 3) -> tuple[list[HeadMatch], Tensor]:
    """Hungarian matching of A's heads to B's heads on profile cosine similarity; (matches, similarity)."""
    if a.concepts != b.concepts:
        raise InvalidInput("dictionary", "both models must be profiled over the same concept list")
    pa, pb = F.normalize(a.profiles, dim=1), F.normalize(b.profiles, dim=1)
    sim = pa @ pb.T  # [nA, nB]
    rows, cols = linear_sum_assignment(-sim.numpy())
    best_b = sim.argmax(1)
    best_a = sim.argmax(0)
    cats_a = cats_b = None
    if categories:
        names, shares_a = category_shares(a, categories)
        _, shares_b = category_shares(b, categories)
        cats_a, cats_b = specialisation(shares_a, names), specialisation(shares_b, names)
    matches = []
    for i, j in zip(rows.tolist(), cols.tolist()):
        joint = (pa[i] * pb[j]).numpy()
        top = [a.concepts[c] for c in np.argsort(-joint, kind="stable")[:shared_top] if joint[c] > 0]
        matches.append(HeadMatch(a=a.heads[i], b=b.heads[j], score=float(sim[i, j]),
                                 mutual=int(best_b[i]) == j and int(best_a[j]) == i,
                                 category_a=cats_a[i] if cats_a else None, category_b=cats_b[j] if cats_b else None,
                                 top_concepts=top))
    matches.sort(key=lambda m: (-m.score, m.a, m.b))
    return matches, sim


def null_scores(a: HeadProfiles, b: HeadProfiles, permutations: int = 20, seed: int = 0) -> np.ndarray:
    """Chance level of the mean matched score: B's concept labels shuffled (one permutation for all
    its heads, so profile sparsity and head-to-head structure survive but meaning does not)."""
    rng = np.random.default_rng(seed)
    pa = F.normalize(a.profiles, dim=1).numpy()
    pb = F.normalize(b.profiles, dim=1).numpy()
    out = []
    for _ in range(permutations):
        sim = pa @ pb[:, rng.permutation(pb.shape[1])].T
        rows, cols = linear_sum_assignment(-sim)
        out.append(float(sim[rows, cols].mean()))
    return np.asarray(out)
