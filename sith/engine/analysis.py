"""Explaining heads and searching concepts: decomposition -> joint space -> sparse codes (spec §1, §3).

``Analyzer`` owns one model, one dictionary and one image mean, and memoises per layer the SVD,
the joint-space targets of the right singular vectors (head-major: flat index h·r + j) and their
codes. With an ``ArtifactCache`` the SVDs, the data-free image mean and the codes persist across
processes under content keys (model hash, ``CONVENTION``, layer, method, k, λ, dictionary
content, image-mean content).

Head theme
    Concepts that recur across a head's singular vectors. For concept c,
    ``score_c = Σ_j σ_j · coef_{j,c} / Σ_j σ_j`` over all r vectors j of the head, where
    ``coef_{j,c}`` is c's coefficient in vector j's code (0 when absent). A concept scores high
    when it appears in several strong directions with large weight; tail directions (small σ)
    count little. The ``theme_size`` best concepts with score > 0 form the theme.

Concept search (the inverse index)
    For a requested concept c with centred embedding q_c (the dictionary row D̂_c) and a
    singular vector j with joint-space target t_j and code (i_k, a_k):
    ``relevance_j(c) = coef_{j,c} + cos(t_j, q_c)``, and for several concepts the maximum over
    them. The coefficient rewards explanations that name the concept; the cosine catches
    directions that point towards it even when a neighbouring concept took its place in the code.
    Ties are broken by (layer, head, index), so the ranking is deterministic. Concepts must be in
    the dictionary (InvalidInput with close matches), unless ``free_text=True``: then unknown
    strings are encoded on the fly, centred with the dictionary mean, and scored by the cosine
    alone (they cannot appear in a code).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sith.engine.cache import ArtifactCache, tensors_from_bytes, tensors_to_bytes
from sith.engine.decomposition import CONVENTION, LayerSVD, decompose_layer, resolve_heads, resolve_layers
from sith.engine.dictionary import ConceptDictionary, encode_texts
from sith.engine.errors import InvalidInput
from sith.engine.jointspace import JointSpace, resolve_image_mean
from sith.engine.sparse import (
    DEFAULT_COHERENCE,
    DEFAULT_K,
    SparseCodes,
    canonical_method,
    check_coherence,
    encode,
    fidelity,
)

CODES_FORMAT = "codes-v1"

# progress(description, total) -> advance(n): lets the CLI draw bars without the engine knowing rich.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class VectorExplanation:
    layer: int
    head: int
    index: int  # j, the singular vector's rank within its head (0 = largest σ)
    sigma: float
    concepts: list[tuple[str, float]]  # positive coefficients only, descending
    fidelity: float | None = None


@dataclass
class HeadSummary:
    layer: int
    head: int
    vectors: list[VectorExplanation]  # the head's top vectors by σ
    theme: list[tuple[str, float]]  # (concept, score_c), descending


@dataclass
class SearchHit:
    layer: int
    head: int
    index: int
    score: float  # relevance (see module docstring)
    sigma: float
    concepts: list[tuple[str, float]]  # the vector's explanation
    matched: str = ""  # the requested concept that gave the score
    coefficient: float = 0.0  # matched concept's coefficient in the code
    cosine: float = 0.0  # cos(target, matched concept)


@dataclass
class LayerRelevance:
    """Relevance of every singular vector of one layer, with what produced it (all [H, r])."""

    score: Tensor  # max over the requested concepts of coefficient + cosine
    matched: Tensor  # long: position of the winning concept in the request
    coefficient: Tensor  # its coefficient in the vector's code (0 when absent)
    cosine: Tensor  # cos(target, its centred embedding)


def _digest(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class Analyzer:
    """Explains heads of one model with one dictionary; everything per layer is computed once."""

    def __init__(
        self,
        loaded,
        dictionary: ConceptDictionary,
        image_mean: str | Tensor | None = "directions",
        device: str = "cpu",
        cache: ArtifactCache | None = None,
        progress: ProgressFactory | None = None,
    ) -> None:
        if dictionary.centred.shape[1] != loaded.info.output_dim:
            raise InvalidInput("dictionary", f"embedding dim {dictionary.centred.shape[1]} does not match "
                               f"the model's joint dim {loaded.info.output_dim} (built for another model?)")
        self.loaded = loaded
        self.dictionary = dictionary
        self.device = torch.device(device)
        self.cache = cache
        self.progress = progress
        self._image_mean_spec = image_mean
        self._joint: JointSpace | None = None
        self._image_mean_id = ""
        self._atoms: Tensor | None = None
        self._dictionary_id = ""
        self._svd: dict[int, LayerSVD] = {}
        self._targets: dict[int, Tensor] = {}
        self._codes: dict[tuple, SparseCodes] = {}

    # ---------------------------------------------------------------- cached building blocks

    def _key(self, *parts: object) -> str:
        return "/".join(["sith", self.loaded.hash, CONVENTION, *map(str, parts)])

    def _cached_tensors(self, key: str, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        if self.cache is not None:
            data = self.cache.get(key)
            if data is not None:
                return tensors_from_bytes(data)
        tensors = build()
        if self.cache is not None:
            self.cache.put(key, tensors_to_bytes(tensors))
        return tensors

    @property
    def joint(self) -> JointSpace:
        """The joint-space map with the resolved image mean (the data-free one is cached)."""
        if self._joint is None:
            spec = self._image_mean_spec
            if isinstance(spec, str) and spec.lower() == "directions":
                mean = self._cached_tensors(self._key("image-mean", "directions"),
                                            lambda: {"mean": resolve_image_mean(self.loaded, "directions")})["mean"]
            else:
                mean = resolve_image_mean(self.loaded, spec)
            self._image_mean_id = "none" if mean is None else _digest(mean)
            self._joint = JointSpace.for_model(self.loaded, mean)
        return self._joint

    @property
    def atoms(self) -> Tensor:
        """The centred dictionary D̂ on the analysis device."""
        if self._atoms is None:
            self._atoms = self.dictionary.centred.to(self.device, torch.float32)
            self._dictionary_id = _digest(self.dictionary.centred)  # content, not just the word list
        return self._atoms

    def decomposition(self, layers: int | Sequence[int] | None = None) -> dict[int, LayerSVD]:
        """SVD of every head of the chosen layers (default the last four)."""
        blocks = self.loaded.model.visual.transformer.resblocks
        result = {}
        for layer in resolve_layers(self.loaded.info, layers):
            if layer not in self._svd:
                def build(layer: int = layer) -> dict[str, Tensor]:
                    with torch.no_grad():
                        svd = decompose_layer(blocks[layer], self.loaded.info.heads, layer)
                    return {"U": svd.U, "S": svd.S, "V": svd.V}

                t = self._cached_tensors(self._key("svd", f"layer-{layer}"), build)
                self._svd[layer] = LayerSVD(layer=layer, U=t["U"], S=t["S"], V=t["V"])
            result[layer] = self._svd[layer]
        return result

    def targets(self, layer: int) -> Tensor:
        """Joint-space targets [H·r, D] of the layer's right singular vectors, head-major."""
        if layer not in self._targets:
            v = self.decomposition([layer])[layer].V  # [H, d, r]
            vectors = v.transpose(1, 2).reshape(-1, v.shape[1])
            model_device = next(self.loaded.model.parameters()).device
            self._targets[layer] = self.joint.map(vectors.to(model_device)).to(self.device)
        return self._targets[layer]

    def codes(self, layer: int, method: str = "comp", k: int = DEFAULT_K,
              coherence: float = DEFAULT_COHERENCE) -> SparseCodes:
        """Codes [H·r, k] of the layer's singular vectors (head-major)."""
        method = canonical_method(method)
        atoms = self.atoms
        targets = self.targets(layer)
        lam = repr(check_coherence(coherence)) if method == "comp" else "-"
        memo = (layer, method, k, lam)
        if memo not in self._codes:
            key = self._key(CODES_FORMAT, f"layer-{layer}", method, f"k-{k}", f"coherence-{lam}",
                            f"dictionary-{self._dictionary_id}", f"image-mean-{self._image_mean_id}")

            def build() -> dict[str, Tensor]:
                advance = self.progress(f"{method} layer {layer}", targets.shape[0]) if self.progress else None
                codes = encode(method, targets, atoms, k=k, coherence=coherence, progress=advance)
                return {"indices": codes.indices, "coefficients": codes.coefficients}

            t = self._cached_tensors(key, build)
            self._codes[memo] = SparseCodes(t["indices"].to(self.device), t["coefficients"].to(self.device))
        return self._codes[memo]

    # ---------------------------------------------------------------- explanations

    def _concepts(self, indices: Tensor, coefficients: Tensor) -> list[tuple[str, float]]:
        names = self.dictionary.concepts
        return [(names[i], round(c, 6)) for i, c in zip(indices.tolist(), coefficients.tolist()) if c > 0]

    def explain(
        self,
        layers: int | Sequence[int] | None = None,
        heads: int | Sequence[int] | None = None,
        method: str = "comp",
        k: int = DEFAULT_K,
        coherence: float = DEFAULT_COHERENCE,
        vectors: int = 5,
        theme_size: int = 5,
        with_fidelity: bool = False,
    ) -> list[HeadSummary]:
        """Per head: its ``vectors`` strongest singular vectors explained, and its theme."""
        for name, value in (("vectors", vectors), ("theme_size", theme_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(name, f"must be a non-negative integer, got {value!r}")
        layer_list = resolve_layers(self.loaded.info, layers)
        head_list = resolve_heads(self.loaded.info, heads)
        summaries = []
        for layer in layer_list:
            svd = self.decomposition([layer])[layer]
            codes = self.codes(layer, method, k, coherence)
            rank = svd.S.shape[1]
            fid = None
            if with_fidelity:
                raw = svd.V.transpose(1, 2).reshape(-1, svd.V.shape[1])
                fid = fidelity(codes, self.atoms, self.joint, raw.to(self.device)).cpu()
            for head in head_list:
                rows = slice(head * rank, (head + 1) * rank)
                sigma = svd.S[head].float()
                explained = [
                    VectorExplanation(
                        layer=layer, head=head, index=j, sigma=float(sigma[j]),
                        concepts=self._concepts(codes.indices[rows][j], codes.coefficients[rows][j]),
                        fidelity=None if fid is None else float(fid[rows][j]),
                    )
                    for j in range(min(vectors, rank))
                ]
                theme = self._theme(sigma, codes.indices[rows], codes.coefficients[rows], theme_size)
                summaries.append(HeadSummary(layer=layer, head=head, vectors=explained, theme=theme))
        return summaries

    def _theme(self, sigma: Tensor, indices: Tensor, coefficients: Tensor, size: int) -> list[tuple[str, float]]:
        """score_c = Σ_j σ_j·coef_{j,c} / Σ_j σ_j; the ``size`` best concepts with score > 0."""
        total = float(sigma.sum())
        if size == 0 or total <= 0:
            return []
        weights = (sigma.to(coefficients.device)[:, None] * coefficients).flatten()
        flat = indices.flatten()
        unique, inverse = torch.unique(flat, return_inverse=True)
        scores = torch.zeros(unique.shape[0], dtype=weights.dtype, device=weights.device)
        scores.index_add_(0, inverse, weights)
        scores = scores / total
        # Sort by score, then by dictionary index, so ties come out the same on every run.
        order = sorted(range(unique.shape[0]), key=lambda i: (-float(scores[i]), int(unique[i])))
        names = self.dictionary.concepts
        return [(names[int(unique[i])], round(float(scores[i]), 6)) for i in order[:size] if scores[i] > 0]

    # ---------------------------------------------------------------- concept search

    def _queries(self, concepts: Sequence[str], free_text: bool) -> tuple[list[str], list[int | None], Tensor]:
        """Requested concepts, their dictionary rows (None for free text) and centred embeddings [C, D]."""
        if isinstance(concepts, str):
            concepts = [concepts]
        if not concepts:
            raise InvalidInput("concepts", "give at least one concept")
        names, rows, missing = [], [], []
        for i, concept in enumerate(concepts):
            if not isinstance(concept, str) or not concept.strip():
                raise InvalidInput(f"concepts[{i}]", "must be a non-empty string")
            name = concept.strip()
            try:
                rows.append(self.dictionary.index(name))
            except InvalidInput as exc:
                if not free_text:
                    raise InvalidInput(f"concepts[{i}]", exc.reason, exc.suggestions) from None
                rows.append(None)
                missing.append(name)
            names.append(name)
        atoms = self.atoms
        embeddings = torch.empty(len(names), atoms.shape[1], device=atoms.device)
        for i, row in enumerate(rows):
            if row is not None:
                embeddings[i] = atoms[row]
        if missing:
            encoded = F.normalize(encode_texts(self.loaded, missing).float(), dim=-1)
            centre = self.dictionary.embeddings.float().mean(dim=0, keepdim=True)
            encoded = F.normalize(encoded - centre, dim=-1).to(atoms.device)
            free_rows = [i for i, row in enumerate(rows) if row is None]
            embeddings[free_rows] = encoded
        return names, rows, embeddings

    def relevance(
        self,
        concepts: Sequence[str],
        layers: int | Sequence[int] | None = None,
        method: str = "comp",
        k: int = DEFAULT_K,
        coherence: float = DEFAULT_COHERENCE,
        free_text: bool = False,
    ) -> tuple[list[str], dict[int, LayerRelevance]]:
        """The cleaned concept names and, per layer, every vector's relevance (module docstring)."""
        names, rows, queries = self._queries(concepts, free_text)
        out = {}
        for layer in resolve_layers(self.loaded.info, layers):
            targets = self.targets(layer)
            codes = self.codes(layer, method, k, coherence)
            cosine = targets @ queries.T  # [B, C]
            coefficient = torch.zeros_like(cosine)
            for c, row in enumerate(rows):
                if row is not None:
                    coefficient[:, c] = (codes.coefficients * (codes.indices == row)).sum(dim=1)
            score = coefficient + cosine
            best, matched = score.max(dim=1)  # first maximum: the earlier requested concept wins ties
            heads = self.loaded.info.heads
            pick = matched[:, None]
            out[layer] = LayerRelevance(
                score=best.reshape(heads, -1).cpu(),
                matched=matched.reshape(heads, -1).cpu(),
                coefficient=coefficient.gather(1, pick).reshape(heads, -1).cpu(),
                cosine=cosine.gather(1, pick).reshape(heads, -1).cpu(),
            )
        return names, out

    def find(
        self,
        concepts: Sequence[str],
        layers: int | Sequence[int] | None = None,
        top: int | None = 20,
        method: str = "comp",
        k: int = DEFAULT_K,
        coherence: float = DEFAULT_COHERENCE,
        free_text: bool = False,
    ) -> list[SearchHit]:
        """Every (layer, head, vector) of the chosen layers ranked by relevance; the ``top`` best (None: all)."""
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top <= 0):
            raise InvalidInput("top", f"must be a positive integer, got {top!r}")
        names, maps = self.relevance(concepts, layers, method, k, coherence, free_text)
        candidates = []
        for layer, rel in maps.items():
            rank = rel.score.shape[1]
            candidates.extend((-s, layer, i // rank, i % rank) for i, s in enumerate(rel.score.flatten().tolist()))
        candidates.sort()
        hits = []
        for _, layer, head, j in candidates[: top if top is not None else len(candidates)]:
            rel = maps[layer]
            codes = self.codes(layer, method, k, coherence)
            row = head * rel.score.shape[1] + j
            hits.append(SearchHit(
                layer=layer, head=head, index=j,
                score=float(rel.score[head, j]),
                sigma=float(self._svd[layer].S[head, j]),
                concepts=self._concepts(codes.indices[row], codes.coefficients[row]),
                matched=names[int(rel.matched[head, j])],
                coefficient=float(rel.coefficient[head, j]),
                cosine=float(rel.cosine[head, j]),
            ))
        return hits
