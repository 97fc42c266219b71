"""Cross-model head matching by what heads encode (spec §8: the same specialised heads recur).

Two models with different width, depth, seed and joint space share nothing geometric, so heads are
compared through words: each model codes its own singular vectors over its *own* embedding of one
shared vocabulary, and a head's **concept profile** is the σ·coefficient-weighted histogram of its
COMP concepts, p_c = Σ_j σ_j coef_{j,c} / Σ_j σ_j — the Analyzer's theme score, kept for every
concept. Profiles of model A's heads and model B's heads are compared by cosine similarity and
paired by Hungarian matching (maximum total similarity, one-to-one). A pair's match score is its
cosine; ``mutual`` marks pairs that are each other's best match in both directions.

**Chance.** A high match score alone says little: two models trained on one world use the same
few concepts (most profile mass sits on world words), so *any* pairing of their heads scores well.
The null therefore keeps each model's concept usage and destroys only which head carries what: every
concept's column of B's profile matrix is permuted across B's heads (``usage_permutation``), the
Hungarian matching is redone, and the observed mean is compared with that distribution
(one-sided permutation p-value, ``permutation_p``). The older null, one shuffle of B's concept
*labels*, also destroys the shared usage and is far too easy (issue 17); it is kept as
``kind="labels"`` for comparison only. Controls (an untrained vision tower with the trained text
tower, ``untrained_vision_control``) and the mean over *all* head pairs are reported next to it.

**Ground truth** (testbed models): which world factor a head's write carries, measured on images —
per head, η² (bias-corrected: ε²) of each factor on the head's direct write to the class token
(attention-pool towers: its token writes weighted by the pool's attention), mapped into the joint
space (``ground_truth_eta2``). A head's label is its largest-η² factor. Matched pairs' label
agreement is tested against a permutation of B's labels across its heads (label usage kept).

**Profiles** (``PROFILES``, issue 13). COMP codes name the right concept for only about a third of
singular vectors, so the sparse profile above is noisy. The data-free **capacity** profile needs no
coding and no sign convention: for concept c with pulled-back direction ĝ_c (the unit residual
direction whose write moves the embedding's score along c's centred text direction; the edit
planner's ``Geometry.pull_back``), head h's capacity along c is ‖diag(σ) Vᵀ ĝ_c‖², everything the
head can write along ĝ_c, and its profile is the capacity normalised over the vocabulary. The
**relative capacity** profile (``DEFAULT_PROFILE``, the default of ``sith adapt match``, chosen
on the same-family validation pair main ↔ small, docs/towers.md) first divides each concept's
capacity by the mean capacity of all heads of the whole tower: directions the readout amplifies
for every head (the tower's common write) stop dominating, and what is left is what sets this
head apart. The tower-wide mean keeps a head's profile independent of which other layers are
profiled, but not of the other heads: when one head changes (a fine-tune), every head's relative
profile moves. Matching a model with its own fine-tune should therefore use "capacity" (per
head, exact) or "comp".

**Chance for dense profiles.** Capacities of related concepts (all colours, all backgrounds) move
together within a head, because their text directions are correlated. Permuting each concept's
column on its own (the usage null) breaks that correlation, so the permuted heads are incoherent
and an *untrained* tower beats the usage null on capacity profiles. With categories, the
``categories`` null moves every category's block of columns across B's heads as a unit (one
permutation per category; concepts in no category form one more block): each concept's usage and
the within-category structure are kept, and only which head carries which factor is destroyed.
On the testbed 4 of 5 untrained controls sit at this null, one (main ↔ small-s1) still beats
it (docs/towers.md): closer to valid than the usage null for capacity profiles, not exact, so
read a matched score's excess next to the untrained control's.

With named concept categories (e.g. the testbed's factors), each head also gets a specialisation:
the category holding the largest share of its in-category profile mass, if that share is at least
``SPECIALISED_SHARE``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from sith.engine.analysis import Analyzer
from sith.engine.decomposition import LayerSVD, resolve_layers
from sith.engine.errors import InvalidInput
from sith.engine.sparse import DEFAULT_COHERENCE, DEFAULT_K

SPECIALISED_SHARE = 0.5
NULL_KINDS = ("usage", "labels", "categories")
# Head profiles by name (module docstring): the paper's sparse COMP histogram and the data-free capacities.
PROFILES = ("comp", "capacity", "relative-capacity")
DEFAULT_PROFILE = "relative-capacity"
# Factors whose η² labels a head (``group`` is nested in ``shape``, so it is left out).
GROUND_TRUTH_FACTORS = ("shape", "colour", "background", "texture", "size", "count", "position")


@dataclass
class HeadProfiles:
    heads: list[tuple[int, int]]  # (layer, head) per row
    profiles: Tensor  # [n_heads, N] over the shared vocabulary
    concepts: list[str]


def head_profiles(analyzer: Analyzer, layers: int | Sequence[int] | None = None, method: str = "comp",
                  k: int = DEFAULT_K, coherence: float = DEFAULT_COHERENCE, profile: str = "comp") -> HeadProfiles:
    """Concept profile of every head of the chosen layers (default the last four).

    ``profile``: "comp" (the paper's σ-weighted histogram of sparse codes; ``method``, ``k`` and
    ``coherence`` choose the coder), "capacity" or "relative-capacity" (data-free write capacities,
    ``capacity_profiles``; the coder options are ignored)."""
    if profile not in PROFILES:
        raise InvalidInput("profile", f"unknown profile {profile!r}", suggestions=list(PROFILES))
    if profile != "comp":
        return capacity_profiles(analyzer, layers, relative=profile == "relative-capacity")
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


def concept_directions(analyzer: Analyzer) -> Tensor:
    """[N, d] unit pulled-back direction ĝ_c of every dictionary concept, in the residual stream.

    The edit planner's ``Geometry.pull_back`` of c's unit centred text direction: ĝ_c = C(Π r̂_c)
    with Π the readout's linear part (``pullback_matrix``: diag(γ_post) P for open_clip). A head's
    write w moves the embedding's score along r̂_c by w·ĝ_c to first order, whatever the tower."""
    from sith.edits.operators import Geometry

    geometry = Geometry(analyzer.joint, analyzer.dictionary, {})
    return torch.stack([geometry.residual_direction(c) for c in analyzer.dictionary.concepts])


def write_capacity(svd: LayerSVD, directions: Tensor) -> Tensor:
    """[H, N] ‖diag(σ) Vᵀ g_n‖² per head and direction: the squared norm of everything head h can
    write along g_n (``LayerSVD.write_coords``, as ``Geometry.head_coords``). Flipping the sign of a
    singular vector pair changes nothing, and no sparse code is involved."""
    return (svd.write_coords(directions) ** 2).sum(1)


def capacity_profiles(analyzer: Analyzer, layers: int | Sequence[int] | None = None,
                      relative: bool = True) -> HeadProfiles:
    """Write-capacity profile of every head of the chosen layers (module docstring, "Profiles").

    p_c = cap_c / Σ_c' cap_c' with cap_c = ‖diag(σ) Vᵀ ĝ_c‖² (``write_capacity``): nonnegative,
    sums to one, sign-free. ``relative``: cap_c is first divided by the mean of cap_c over every
    head of every layer of the tower (not only the profiled ones), so a head's profile says where
    it writes *more than the tower's average head*, and does not depend on ``layers`` (but moves
    when any head of the tower changes; ``relative=False`` is per head)."""
    chosen = resolve_layers(analyzer.loaded.info, layers)
    directions = concept_directions(analyzer)
    every = list(range(analyzer.loaded.info.layers)) if relative else chosen
    capacity = {layer: write_capacity(svd, directions) for layer, svd in analyzer.decomposition(every).items()}
    rows = torch.cat([capacity[layer] for layer in chosen])
    if relative:
        rows = rows / torch.cat(list(capacity.values())).mean(0, keepdim=True).clamp_min(1e-30)
    rows = rows / rows.sum(1, keepdim=True).clamp_min(1e-30)
    heads = [(layer, h) for layer in chosen for h in range(capacity[layer].shape[0])]
    return HeadProfiles(heads=heads, profiles=rows.float(), concepts=list(analyzer.dictionary.concepts))


def category_blocks(concepts: Sequence[str], categories: Mapping[str, Sequence[str]]) -> list[list[int]]:
    """Column indices per category (a concept in several goes to the first), then one block of the
    concepts in no category: the units the ``categories`` null moves across heads."""
    index = {c: i for i, c in enumerate(concepts)}
    seen: set[int] = set()
    blocks = []
    for words in categories.values():
        block = [index[w] for w in dict.fromkeys(words) if w in index and index[w] not in seen]
        seen.update(block)
        if block:
            blocks.append(block)
    rest = [i for i in range(len(concepts)) if i not in seen]
    return blocks + ([rest] if rest else [])


def category_permutation(profiles: np.ndarray, blocks: Sequence[Sequence[int]], rng: np.random.Generator) -> np.ndarray:
    """Each block of columns permuted across the heads (rows) as a unit, one permutation per block.

    Keeps every concept's usage and, within a block, which concepts go together in a head;
    destroys only which head carries which block (factor)."""
    out = profiles.copy()
    for block in blocks:
        out[:, block] = profiles[rng.permutation(profiles.shape[0])][:, block]
    return out


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


def dominant_category(shares: Tensor, names: list[str]) -> list[str | None]:
    """Per head, the category with the most profile mass (None for a head with no in-category mass)."""
    best, arg = shares.max(dim=1)
    return [names[int(a)] if float(b) > 0 else None for b, a in zip(best, arg)]


@dataclass
class HeadMatch:
    a: tuple[int, int]  # (layer, head) in model A
    b: tuple[int, int]
    score: float  # cosine of the two profiles
    mutual: bool  # each is the other's best match
    category_a: str | None = None
    category_b: str | None = None
    top_concepts: list[str] | None = None  # concepts both profiles weigh most (product of the two)
    truth_a: str | None = None  # ground-truth factor label (testbed, when measured)
    truth_b: str | None = None


def similarity_matrix(a: HeadProfiles, b: HeadProfiles) -> Tensor:
    """Profile cosine of every (A head, B head) pair [nA, nB]."""
    if a.concepts != b.concepts:
        raise InvalidInput("dictionary", "both models must be profiled over the same concept list")
    return F.normalize(a.profiles, dim=1) @ F.normalize(b.profiles, dim=1).T


def match_profiles(a: HeadProfiles, b: HeadProfiles, categories: Mapping[str, Sequence[str]] | None = None,
                   shared_top: int = 3) -> tuple[list[HeadMatch], Tensor]:
    """Hungarian matching of A's heads to B's heads on profile cosine similarity; (matches, similarity)."""
    sim = similarity_matrix(a, b)
    pa, pb = F.normalize(a.profiles, dim=1), F.normalize(b.profiles, dim=1)
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


def usage_permutation(profiles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each concept's column permuted independently across the heads (rows).

    Keeps how much every concept is used by the model as a whole (column sums and each column's
    values) and the number of heads; destroys only *which* head carries which concept.
    """
    n_heads = profiles.shape[0]
    order = np.argsort(rng.random(profiles.shape), axis=0)  # an independent permutation per column
    return profiles[order, np.arange(profiles.shape[1])[None, :]] if n_heads else profiles.copy()


def _matched_mean(pa: np.ndarray, pb: np.ndarray) -> float:
    """Mean Hungarian-matched cosine of two raw profile matrices."""
    na = pa / np.maximum(np.linalg.norm(pa, axis=1, keepdims=True), 1e-12)
    nb = pb / np.maximum(np.linalg.norm(pb, axis=1, keepdims=True), 1e-12)
    sim = na @ nb.T
    rows, cols = linear_sum_assignment(-sim)
    return float(sim[rows, cols].mean())


def null_scores(a: HeadProfiles, b: HeadProfiles, permutations: int = 200, seed: int = 0,
                kind: str = "usage", categories: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
    """Mean matched score under the null, one value per permutation.

    ``kind="usage"`` (default): each concept permuted across B's heads (``usage_permutation``).
    ``kind="categories"``: each category's columns permuted across B's heads as one block
    (``category_permutation``; needs ``categories``): the fairer null for dense (capacity) profiles,
    whose related concepts move together.
    ``kind="labels"``: one shuffle of B's concept labels for all its heads (the pre-issue-17 null:
    it also breaks the concept usage both models share, so it is too easy; comparison only).
    """
    if kind not in NULL_KINDS:
        raise InvalidInput("null", f"unknown null {kind!r}", suggestions=list(NULL_KINDS))
    if kind == "categories" and not categories:
        raise InvalidInput("categories", "the categories null needs named concept categories")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise InvalidInput("permutations", f"must be a positive integer, got {permutations!r}")
    if a.concepts != b.concepts:
        raise InvalidInput("dictionary", "both models must be profiled over the same concept list")
    rng = np.random.default_rng(seed)
    pa, pb = a.profiles.double().numpy(), b.profiles.double().numpy()
    blocks = category_blocks(b.concepts, categories) if kind == "categories" else []
    out = []
    for _ in range(permutations):
        if kind == "usage":
            shuffled = usage_permutation(pb, rng)
        elif kind == "categories":
            shuffled = category_permutation(pb, blocks, rng)
        else:
            shuffled = pb[:, rng.permutation(pb.shape[1])]
        out.append(_matched_mean(pa, shuffled))
    return np.asarray(out)


def permutation_p(observed: float, null: np.ndarray) -> float:
    """One-sided permutation p-value, (1 + #{null ≥ observed}) / (1 + n): never 0, always in (0, 1]."""
    null = np.asarray(null, dtype=float)
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def label_agreement(pairs: Sequence[tuple[int, int]], labels_a: Sequence[str | None], labels_b: Sequence[str | None],
                    permutations: int = 1000, seed: int = 0) -> dict:
    """Share of matched pairs (row i of A, row j of B) whose labels agree, against chance.

    Chance permutes B's labels across B's heads (so how often each label occurs is kept) and
    re-reads the same pairs; pairs with a None label count as disagreeing. ``per_label``: for each
    label L of A, how many of A's L-heads are paired with an L-head of B, against the same
    permutations (so a frequent label's agreement is not mistaken for skill on a rare one).
    """
    if not pairs:
        return {"observed": float("nan"), "chance_mean": float("nan"), "p_value": 1.0, "pairs": 0, "per_label": {}}
    la = [labels_a[i] for i, _ in pairs]
    lb = np.asarray([labels_b[j] if labels_b[j] is not None else "" for j in range(len(labels_b))], dtype=object)
    cols = np.asarray([j for _, j in pairs])
    la_arr = np.asarray(la, dtype=object)

    def hits(b_labels: np.ndarray) -> np.ndarray:
        return np.asarray([x is not None and x == y for x, y in zip(la, b_labels[cols])])

    observed_hits = hits(lb)
    rng = np.random.default_rng(seed)
    null_hits = np.stack([hits(lb[rng.permutation(len(lb))]) for _ in range(permutations)])  # [P, pairs]
    observed, null = float(observed_hits.mean()), null_hits.mean(1)
    per_label = {}
    for label in sorted({x for x in la if x is not None}):
        rows = la_arr == label
        agreeing, chance = int(observed_hits[rows].sum()), null_hits[:, rows].sum(1)
        per_label[label] = {"pairs": int(rows.sum()), "agreeing": agreeing, "chance_mean": float(chance.mean()),
                            "p_value": permutation_p(agreeing, chance)}
    return {"observed": observed, "chance_mean": float(null.mean()), "chance_std": float(null.std()),
            "p_value": permutation_p(observed, null), "pairs": len(pairs), "agreeing": int(round(observed * len(pairs))),
            "per_label": per_label}


# --------------------------------------------------------------------------------------------- controls


def untrained_vision_control(loaded, seed: int = 0):
    """A copy of ``loaded`` whose vision tower is re-initialised as open_clip builds it (the text tower,
    temperature and tokenizer stay trained): the control for "any two models look alike".

    open_clip's ``VisionTransformer`` uses PyTorch's default init for its modules and
    ``width**-0.5 · N(0, 1)`` for the class/positional embeddings and the projection; this repeats that.
    Named ``<name>-untrained-vision`` so the model-aware vocabulary rule still applies.
    """
    from sith.engine.models import LoadedModel, vision_hash, vision_info

    model = copy.deepcopy(loaded.model)
    visual = model.visual
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for module in visual.modules():
                if module is not visual and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                if isinstance(module, nn.MultiheadAttention):
                    module._reset_parameters()
            trunk = getattr(visual, "trunk", None)
            embeddings = getattr(visual, "embeddings", None)
            if getattr(visual, "transformer", None) is None and hasattr(trunk, "init_weights"):
                trunk.init_weights()  # a timm trunk (testbed-siglip): timm's own init, MAP latent included
            elif hasattr(embeddings, "class_embedding"):  # transformers CLIP: open_clip's start, as below
                width = embeddings.class_embedding.shape[-1]
                embeddings.class_embedding.copy_(width ** -0.5 * torch.randn_like(embeddings.class_embedding))
                position = embeddings.position_embedding.weight
                position.copy_(width ** -0.5 * torch.randn_like(position))
                projection = getattr(getattr(model, "hf", None), "visual_projection", None)
                if projection is not None:
                    projection.weight.copy_(width ** -0.5 * torch.randn_like(projection.weight))
            else:
                width = visual.transformer.width
                for name in ("class_embedding", "positional_embedding", "proj"):
                    param = getattr(visual, name, None)
                    if isinstance(param, nn.Parameter) and param.requires_grad is not None:
                        param.copy_(width ** -0.5 * torch.randn_like(param))
    finally:
        torch.random.set_rng_state(generator_state)
    model = model.float().eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, name=f"{loaded.name}-untrained-vision",
                       hash=vision_hash(model), info=vision_info(model), preprocess=loaded.preprocess)


# ----------------------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    heads: list[tuple[int, int]]
    factors: list[str]
    eta2: Tensor  # [n_heads, F]: share of the head's write variance explained by each factor (ε², bias-corrected)
    images: int

    def labels(self, relative: bool = False) -> list[str]:
        """Largest-η² factor per head; ``relative``: largest η² over that factor's mean η² in this model
        (raw η² favours background, whose pixels vary most, in every head, trained or not)."""
        eta2 = self.eta2 / self.eta2.mean(0, keepdim=True).clamp_min(1e-12) if relative else self.eta2
        return [self.factors[int(i)] for i in eta2.argmax(1)]


def _eta_squared(z: Tensor, labels: Tensor) -> float:
    """Multivariate ε² (bias-corrected η²) of the rows of ``z`` grouped by ``labels`` (−1 dropped):
    (SS_between − (k − 1)·SS_within/(N − k)) / SS_total, clipped at 0.

    Plain η² = SS_between/SS_total grows by about (k − 1)/(N − 1) by chance, which favours factors
    with many values (shape: 10, size: 2) when few images are used; ε² removes that bias.
    """
    keep = labels >= 0
    z, labels = z[keep].double(), labels[keep]
    centred = z - z.mean(0, keepdim=True)
    total = float((centred ** 2).sum())
    values = labels.unique()
    n, k = len(labels), len(values)
    if total <= 0 or n <= k:
        return 0.0
    between = 0.0
    for value in values:
        rows = centred[labels == value]
        between += len(rows) * float((rows.mean(0) ** 2).sum())
    within = total - between
    return max(0.0, (between - (k - 1) * within / (n - k)) / total)


# Tower families whose image embedding is read from the class token (token 0): only there is "what a
# head writes to the class token" what reaches the embedding. Pooled / attention-pooled towers differ.
CLASS_TOKEN_FAMILIES = ("open_clip-vit", "hf-clip")


def _timm_class_token(tower) -> bool:
    """A timm ViT (``timm-vit``) whose embedding reads its class token (``global_pool='token'``, e.g. testbed-timm)."""
    trunk = getattr(tower.visual, "trunk", None)
    return (tower.family == "timm-vit" and getattr(trunk, "global_pool", None) == "token"
            and getattr(trunk, "cls_token", None) is not None)


# Tower families whose embedding is a learnt attention pool over all tokens (timm MAP head): what reaches
# the embedding from a head is its writes to every token, weighted by the pool's attention.
ATTENTION_POOL_FAMILIES = ("timm-vit-map",)


def _readout_tower(loaded, field: str = "ground_truth"):
    """The tower adapter if ground truth can read it (class token or MAP pool), else InvalidInput naming it."""
    from sith.engine.towers import adapter_for

    tower = adapter_for(loaded, field)
    return tower if tower.family in ATTENTION_POOL_FAMILIES else _class_token_tower(loaded, field)


def head_pooled_writes(loaded, images: Tensor, batch_size: int = 100) -> dict[int, Tensor]:
    """Per layer [H, B, d]: each head's writes to every token, averaged over tokens with the MAP head's
    attention weights (their mean over its heads and latents; they sum to one), out-projection bias and
    LayerScale left out. The counterpart of ``head_cls_writes`` for attention-pool towers
    (``ATTENTION_POOL_FAMILIES``); InvalidInput naming the tower otherwise."""
    from sith.engine.towers import adapter_for, tower_kind

    tower = adapter_for(loaded, "ground_truth")
    if tower.family not in ATTENTION_POOL_FAMILIES:
        raise InvalidInput("ground_truth", f"pooled head writes need an attention-pool (MAP) tower; "
                           f"{tower_kind(tower.model)} is {tower.family}")
    model = tower.model
    tokens: dict[int, list[Tensor]] = {i: [] for i in range(tower.num_layers)}
    weights: list[Tensor] = []
    captured: dict[int, list[Tensor]] = {i: [] for i in range(tower.num_layers)}
    handles = [tower.access(i).out.register_forward_pre_hook(_token_hook(tower.access(i), tokens[i]))
               for i in range(tower.num_layers)]
    handles.append(model.visual.trunk.attn_pool.register_forward_pre_hook(_pool_hook(weights)))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model.encode_image(images[start:start + batch_size].to(device))
                attention = weights.pop()  # [B, T]
                for i in captured:
                    captured[i].append(torch.einsum("hbtd,bt->hbd", tokens[i].pop(), attention))
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(parts, dim=1) for i, parts in captured.items()}


def _token_hook(access, sink: list[Tensor]):
    """Every token's per-head write: the output Linear's input [B, T, H·dh] through each head's columns."""
    heads, dh = access.num_heads, access.head_dim

    def run(module: nn.Linear, args) -> None:
        x = args[0]
        w_o = module.weight.reshape(module.weight.shape[0], heads, dh)
        sink.append(torch.einsum("bthe,dhe->hbtd", x.reshape(*x.shape[:2], heads, dh), w_o).detach().cpu())
    return run


def _pool_hook(sink: list[Tensor]):
    """timm AttentionPoolLatent's attention over tokens, recomputed from its input: [B, T] (mean over heads)."""
    def run(module: nn.Module, args) -> None:
        x = args[0]
        b, n, _ = x.shape
        if module.pos_embed is not None:
            x = x + module.pos_embed.unsqueeze(0).to(x.dtype)
        q = module.q(module.latent.expand(b, -1, -1)).reshape(b, module.latent_len, module.num_heads, module.head_dim)
        k = module.kv(x).reshape(b, n, 2, module.num_heads, module.head_dim)[:, :, 0]
        q, k = module.q_norm(q.transpose(1, 2)), module.k_norm(k.transpose(1, 2))
        attention = torch.softmax((q * module.scale) @ k.transpose(-2, -1), dim=-1)  # [B, heads, latents, T]
        sink.append(attention.mean((1, 2)).detach().cpu())
    return run


def _class_token_tower(loaded, field: str = "ground_truth"):
    """The tower adapter of ``loaded`` if its embedding reads the class token, else InvalidInput naming it."""
    from sith.engine.towers import adapter_for, tower_kind

    tower = adapter_for(loaded, field)
    if tower.family not in CLASS_TOKEN_FAMILIES and not _timm_class_token(tower):
        name = getattr(loaded, "name", type(tower.model).__name__)
        raise InvalidInput(field, f"ground truth reads each head's write to the class token, but {name}'s vision "
                           f"tower is {tower_kind(tower.model)} ({tower.family}), whose embedding is not read from "
                           f"the class token; supported tower families: {', '.join(CLASS_TOKEN_FAMILIES)}")
    return tower


def _mha_hook(access, sink: list[Tensor]):
    """nn.MultiheadAttention never calls its out_proj as a module, so the class-token row of each head's
    attention output is recomputed from the attention's own input (the block's normalised stream)."""
    heads, dh, d = access.num_heads, access.head_dim, access.width

    def run(module: nn.MultiheadAttention, args, kwargs) -> None:
        x = args[0] if args else kwargs["query"]
        if not module.batch_first:
            x = x.transpose(0, 1)  # [T, B, d] -> [B, T, d]
        qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)  # [B, T, 3d]
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        b, t, _ = x.shape
        q0 = q[:, 0].reshape(b, heads, dh)
        attn = torch.softmax(torch.einsum("bhd,bthd->bht", q0, k.reshape(b, t, heads, dh)) / dh ** 0.5, dim=-1)
        out = torch.einsum("bht,bthd->bhd", attn, v.reshape(b, t, heads, dh))  # [B, H, dh]
        sink.append(_per_head(out, access.out.weight, heads, dh))
    return run


def _out_hook(access, sink: list[Tensor]):
    """Blocks whose output Linear is called as a module (timm, transformers): its input is the
    concatenated per-head attention outputs [B, T, H·dh], so the class token's row is read directly."""
    heads, dh = access.num_heads, access.head_dim

    def run(module: nn.Linear, args) -> None:
        x = args[0]
        sink.append(_per_head(x[:, 0].reshape(x.shape[0], heads, dh), module.weight, heads, dh))
    return run


def _per_head(out: Tensor, weight: Tensor, heads: int, dh: int) -> Tensor:
    """[B, H, dh] head outputs through each head's columns of the output weight [d, H·dh] -> [H, B, d]."""
    w_o = weight.reshape(weight.shape[0], heads, dh)
    return torch.einsum("bhe,dhe->hbd", out, w_o).detach().cpu()


def head_cls_writes(loaded, images: Tensor, batch_size: int = 250) -> dict[int, Tensor]:
    """Per layer [H, B, d]: what each head adds to the class token (attention-weighted values through
    its slice of W_O, out-projection bias and LayerScale left out).

    Reached through the tower adapter (its blocks, head shapes and output Linears), for towers whose
    embedding reads the class token (``CLASS_TOKEN_FAMILIES``); InvalidInput naming the tower otherwise.
    """
    from sith.engine.towers.blocks import MHABlock

    tower = _class_token_tower(loaded)
    model = tower.model
    captured: dict[int, list[Tensor]] = {i: [] for i in range(tower.num_layers)}
    handles = []
    try:
        for i in range(tower.num_layers):
            access = tower.access(i)
            if isinstance(access, MHABlock):
                handles.append(access.block.attn.register_forward_pre_hook(_mha_hook(access, captured[i]),
                                                                           with_kwargs=True))
            else:
                handles.append(access.out.register_forward_pre_hook(_out_hook(access, captured[i])))
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model.encode_image(images[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(parts, dim=1) for i, parts in captured.items()}


def ground_truth_eta2(loaded, n_images: int = 1000, layers: int | Sequence[int] | None = None,
                      factors: Sequence[str] = GROUND_TRUTH_FACTORS) -> GroundTruth:
    """η² of each world factor on every head's class-token write, mapped into the joint space
    (ln_post's gain and the projection; the per-image LayerNorm scale is left out), over ``n_images``
    held-out natural world images (the evaluation's factor set: seed 1,000,000).

    Attention-pool (MAP) towers (``ATTENTION_POOL_FAMILIES``, e.g. testbed-siglip) have no class
    token: there the write is the head's token writes averaged with the MAP head's own attention
    (``head_pooled_writes``), mapped through the final norm's gain and the pool's value/output maps."""
    from sith.testbed.evaluate import factor_set

    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 10:
        raise InvalidInput("n_images", f"needs an integer >= 10, got {n_images!r}")
    tower = _readout_tower(loaded)
    pullback = tower.pullback_matrix()  # diag(γ_post) P (MAP: diag(γ_norm) W_v W_proj): the readout's linear part
    if pullback is None:
        raise InvalidInput("ground_truth", f"{loaded.name}: the vision tower's readout has no linear part")
    pullback = pullback.detach().float().cpu()
    batch = factor_set(n_images)
    pooled = tower.family in ATTENTION_POOL_FAMILIES
    writes = (head_pooled_writes if pooled else head_cls_writes)(loaded, batch.images)
    chosen = resolve_layers(loaded.info, layers) if layers is not None else list(range(loaded.info.layers))
    heads, rows = [], []
    for layer in chosen:
        for h in range(loaded.info.heads):
            z = writes[layer][h]
            z = (z - z.mean(1, keepdim=True)) @ pullback
            heads.append((layer, h))
            rows.append([_eta_squared(z, batch.labels[f]) for f in factors])
    return GroundTruth(heads=heads, factors=list(factors), eta2=torch.tensor(rows), images=n_images)


def ground_truth_similarity(pairs: Sequence[tuple[int, int]], truth_a: Tensor, truth_b: Tensor,
                            permutations: int = 1000, seed: int = 0) -> dict:
    """Mean cosine between matched heads' ground-truth profiles, against random pairings of B's heads.

    A head's profile is its η² of every factor divided by that factor's mean η² over the model's
    heads (the relative profile behind ``GroundTruth.labels(relative=True)``: raw η² favours
    background in every head, trained or not). Unlike label agreement it uses every factor, not
    only the largest. ``truth_a`` / ``truth_b`` are η² rows [n_heads, F] in the profiles' order;
    chance re-pairs the same A heads with a permutation of B's heads."""
    if not pairs:
        return {"observed": float("nan"), "chance_mean": float("nan"), "chance_std": float("nan"), "p_value": 1.0,
                "pairs": 0}

    def relative(eta: Tensor) -> np.ndarray:
        eta = eta.double()
        eta = eta / eta.mean(0, keepdim=True).clamp_min(1e-12)
        return F.normalize(eta, dim=1).numpy()

    ra, rb = relative(truth_a), relative(truth_b)
    rows = np.asarray([i for i, _ in pairs])
    cols = np.asarray([j for _, j in pairs])
    observed = float(np.mean(np.sum(ra[rows] * rb[cols], axis=1)))
    rng = np.random.default_rng(seed)
    null = np.asarray([np.mean(np.sum(ra[rows] * rb[rng.permutation(len(rb))][cols], axis=1))
                       for _ in range(permutations)])
    return {"observed": observed, "chance_mean": float(null.mean()), "chance_std": float(null.std()),
            "p_value": permutation_p(observed, null), "pairs": len(pairs)}


def _truth_rows(profiles: HeadProfiles, truth: GroundTruth) -> list[int]:
    """Row of ``truth`` for each of ``profiles.heads``; InvalidInput when a head was not measured."""
    index = {h: i for i, h in enumerate(truth.heads)}
    missing = [h for h in profiles.heads if h not in index]
    if missing:
        raise InvalidInput("ground_truth", f"no ground truth for heads {missing[:3]}")
    return [index[h] for h in profiles.heads]


def aligned_eta2(profiles: HeadProfiles, truth: GroundTruth) -> Tensor:
    """η² rows [n_heads, F] in the order of ``profiles.heads``."""
    return truth.eta2[_truth_rows(profiles, truth)]


def align_ground_truth(profiles: HeadProfiles, truth: GroundTruth, relative: bool = False) -> list[str]:
    """Ground-truth labels in the order of ``profiles.heads``."""
    labels = truth.labels(relative)
    return [labels[i] for i in _truth_rows(profiles, truth)]
