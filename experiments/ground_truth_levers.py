"""Levers measured against the ground truth beyond the harness's vocabulary × map × coder grid.

Each lever changes one thing of the shipped default (world+learnt vocabulary, "poles" image mean,
``specific`` coder) and is scored on both splits with ``ground_truth.score_setting``; the harness
(``ground_truth.run_model``) adds them as ``results["levers"]`` and ``tables.md`` lists them.

Lever letters continue docs/explanations.md's table ((a)–(e) were measured before).

* **(f) prompt ensembles** (text-only, data-free): a concept's embedding is the normalised mean of the
  encodings of several sentences instead of the bare word.
  - ``templates``: the caption prefixes the testbed tower was trained with ("{}", "a photo of {}",
    "an image of {}", "a picture of {}"), the usual real-model template ensemble;
  - ``grammar``: sentences of the testbed caption grammar that name the word with every *other*
    factor varied ("a red {shape} {background phrase}", with sizes, textures, counts mixed in), the
    same contexts for every value of a factor, so averaging marginalises the other factors out;
    centred over the whole dictionary ("global") or within each factor's words ("per factor": the
    ensemble mean of the factor is subtracted, leaving the value's own direction).
* **(g) per-factor calibration**: the factor is chosen first, by the best specificity z of its words
  standardised over the tower (so a factor with 20 words, shape, no longer wins by having more
  draws), optionally with the −v pole's evidence added; then the best word of that factor.
* **(h) shared directions**: remove the top k principal directions of the tower's mapped vectors from
  every target (k = 1..4; the default uses ``DEFAULT_SHARED_DIRECTIONS`` = 2), over the tower or per layer.
* **(i) read side**: explain the left singular vector u_j (what the vector reads) through the same map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sith.engine.analysis import remove_shared, shared_directions
from sith.engine.decomposition import decompose_layer
from sith.engine.dictionary import encode_texts
from sith.engine.sparse import atom_statistics
from sith.testbed.factors import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    PLURALS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    TEXTURES,
    article,
)
from sith.testbed.vocabulary import testbed_categories, word_values

TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture of {}")
_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ")
GRAMMAR_SENTENCES = 40


def _noun_phrase(rng: np.random.Generator, factor: str, value: str, word: str) -> str:
    """One caption-grammar phrase that names ``word`` (factor ``factor``); the other slots are drawn
    from ``rng`` and shown with fixed probabilities."""
    def pick(options):
        return options[int(rng.integers(len(options)))]

    count = pick([1, 1, 2, 3])
    shape = pick(SHAPES)
    size, texture, colour, background = pick(SIZES), pick(TEXTURES[1:]), pick(list(COLOURS)), pick(BACKGROUNDS)
    show = {"size": rng.random() < 0.4, "texture": rng.random() < 0.3, "colour": rng.random() < 0.6,
            "shape": rng.random() < 0.7, "background": rng.random() < 0.6}
    phrase_choice = rng.random()
    if factor == "shape":
        shape, count = value, (count if count > 1 else 2) if word != value else 1
    elif factor == "count":
        count = int(value)
    elif factor in ("colour", "size", "texture"):
        locals_ = {"colour": colour, "size": size, "texture": texture}
        locals_[factor] = value
        colour, size, texture = locals_["colour"], locals_["size"], locals_["texture"]
    elif factor == "background":
        background = value
    if factor in show:
        show[factor] = True
    words = [size] if show["size"] else []
    if show["texture"]:
        words.append(texture)
    if show["colour"]:
        words.append(colour)
    if factor == "group":
        words += [value, "shapes" if count > 1 else "shape"]
    elif show["shape"]:
        words.append(PLURALS[shape] if count > 1 else shape)
    else:
        words.append("objects" if count > 1 else "object")
    text = " ".join(words)
    text = f"{COUNT_WORDS[count]} {text}" if count > 1 or factor == "count" else f"{article(text)} {text}"
    if show["background"]:
        phrases = BACKGROUND_PHRASES[background]
        text += " " + phrases[int(phrase_choice * len(phrases))]
    if factor == "position":
        text += " " + POSITION_PHRASES[value]
    return pick(_PREFIXES) + text


def grammar_prompts(word: str, n: int = GRAMMAR_SENTENCES, seed: int = 0) -> list[str] | None:
    """``n`` caption-grammar sentences naming a world word with the other factors varied; None for a
    word that names no factor value. The generator is seeded by the factor, so every value of a
    factor gets the same contexts (the other factors cancel when the factor's mean is removed)."""
    found = word_values().get(word)
    if found is None:
        return None
    factor, value = found
    rng = np.random.default_rng([seed, sum(map(ord, factor))])
    return [_noun_phrase(rng, factor, value, word) for _ in range(n)]


def ensemble_embeddings(loaded, words: list[str], prompts) -> Tensor:
    """[N, D] normalised mean of the normalised encodings of ``prompts(word)`` (the bare word when it
    returns None)."""
    rows = []
    for word in words:
        texts = prompts(word) or [word]
        rows.append(F.normalize(F.normalize(encode_texts(loaded, texts), dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def centred_atoms(embeddings: Tensor, groups: list[str] | None = None) -> Tensor:
    """normalise(E − mean): over the whole dictionary, or within each group of ``groups``."""
    e = F.normalize(embeddings.float(), dim=-1)
    if groups is None:
        return F.normalize(e - e.mean(0, keepdim=True), dim=-1)
    out = torch.empty_like(e)
    for g in dict.fromkeys(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        out[rows] = e[rows] - e[rows].mean(0, keepdim=True)
    return F.normalize(out, dim=-1)


def word_groups(words: list[str]) -> list[str]:
    owner = {w: g for g, ws in testbed_categories().items() for w in ws}
    return [owner.get(w, "other") for w in words]


def factor_first(targets_pos: Tensor, targets_neg: Tensor, population: Tensor, atoms: Tensor, words: list[str],
                 both_poles: bool) -> tuple[list[str], list[str]]:
    """Top-1 words when the factor is chosen first (module docstring, per-factor calibration)."""
    mean, scale = atom_statistics(population, atoms)
    z = lambda x: (x @ atoms.T - mean) / scale  # noqa: E731
    zp, zn, zpop = z(targets_pos), z(targets_neg), z(population)
    groups = word_groups(words)
    names = list(dict.fromkeys(groups))
    index = {g: torch.tensor([i for i, x in enumerate(groups) if x == g]) for g in names}

    def group_scores(values: Tensor) -> Tensor:
        best = torch.stack([values[:, index[g]].max(1).values for g in names], 1)
        ref = torch.stack([zpop[:, index[g]].max(1).values for g in names], 1)
        return (best - ref.mean(0)) / ref.std(0).clamp_min(1e-6)

    gp, gn = group_scores(zp), group_scores(zn)
    if both_poles:
        gp = gn = gp + gn

    def tops(values: Tensor, scores: Tensor) -> list[str]:
        chosen = scores.argmax(1).tolist()
        out = []
        for row, g in enumerate(chosen):
            cols = index[names[g]]
            out.append(words[int(cols[values[row, cols].argmax()])])
        return out

    return tops(zp, gp), tops(zn, gn)


def read_side(loaded, rows: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor]:
    """[V, d] left singular vectors u_j of the studied rows, and [every, d] of the whole tower."""
    blocks = loaded.model.visual.transformer.resblocks
    u = {layer: decompose_layer(block, loaded.info.heads, layer).U.float() for layer, block in enumerate(blocks)}
    studied = torch.stack([u[layer][head, :, j] for layer, head, j in rows])
    every = torch.cat([u[layer].transpose(1, 2).reshape(-1, u[layer].shape[1]) for layer in sorted(u)])
    return studied, every


def per_layer_shared(mapping, t, count: int):
    """Layer-aware map: remove the top ``count`` principal directions of each layer's own mapped
    vectors (both poles) from that layer's targets."""
    bases = {}
    for layer in t.layers:
        every = t.all_vectors[layer]
        bases[layer] = shared_directions(torch.cat([mapping(every), mapping(-every)]), count)

    def apply(vectors: Tensor, layers: list[int]) -> Tensor:
        mapped = mapping(vectors)
        out = torch.empty_like(mapped)
        for layer in set(layers):
            rows = [i for i, x in enumerate(layers) if x == layer]
            out[rows] = remove_shared(mapped[rows], bases[layer])
        return out

    apply.layer_aware = True  # type: ignore[attr-defined]
    return apply


def measure_levers(harness, loaded, t, poles_map, dictionary, truths: dict, log=print) -> list[dict]:
    """Every lever of the module docstring on every split: rows {lever, setting, <split>: scores}."""
    words, raw = dictionary.concepts, dictionary.embeddings
    groups = word_groups(words)
    rows: list[dict] = []

    def add(lever: str, setting: str, explain) -> None:
        row = {"lever": lever, "setting": setting}
        ex = explain()
        for split, truth in truths.items():
            row[split] = harness.score_setting(t, ex, truth)
        rows.append(row)

    default_map = harness.shared_removed(loaded, poles_map)
    add("reference", "previous default (poles, specific)",
        lambda: harness.explain_all(t, poles_map, dictionary.centred, words, "specific"))
    add("reference", "default (poles, shared directions removed, specific)",
        lambda: harness.explain_all(t, default_map, dictionary.centred, words, "specific"))
    templates = ensemble_embeddings(loaded, words, lambda w: [x.format(w) for x in TEMPLATES])
    grammar = ensemble_embeddings(loaded, words, grammar_prompts)
    for name, emb in (("caption-prefix template ensemble", templates), ("grammar ensemble", grammar)):
        for centring, grouping in (("global", None), ("per factor", groups)):
            atoms = centred_atoms(emb, grouping)
            for map_name, mapping in (("poles", poles_map), ("poles-shared", default_map)):
                add("(f) prompt ensembles", f"{name}, {centring} centring, {map_name}",
                    lambda atoms=atoms, mapping=mapping: harness.explain_all(t, mapping, atoms, words, "specific"))
    log("  levers: prompt ensembles done")
    every = torch.cat([t.all_vectors[layer] for layer in t.layers])
    for map_name, mapping in (("poles", poles_map), ("poles-shared", default_map)):
        pos, neg = mapping(t.vectors), mapping(-t.vectors)
        population = torch.cat([mapping(every), mapping(-every)])
        base = harness.explain_all(t, mapping, dictionary.centred, words, "specific")
        for both in (False, True):
            def explain(pos=pos, neg=neg, population=population, base=base, both=both):
                top_pos, top_neg = factor_first(pos, neg, population, dictionary.centred, words, both)
                sets = [[w] + [x for x in s if x != w][:4] for w, s in zip(top_pos, base.sets_pos)]
                return harness.Explained(top_pos, top_neg, sets, base.codes, base.targets, base.population)
            add("(g) per-factor calibration", f"factor first ({'both poles' if both else '+v only'}), {map_name}", explain)
    for count in (1, 2, 3, 4):
        mapping = harness.shared_removed(loaded, poles_map, count)
        add("(h) shared directions", f"remove top {count} (whole tower)",
            lambda mapping=mapping: harness.explain_all(t, mapping, dictionary.centred, words, "specific"))
    for count in (1, 2):
        mapping = per_layer_shared(poles_map, t, count)
        add("(h) shared directions", f"remove top {count} per layer",
            lambda mapping=mapping: harness.explain_all(t, mapping, dictionary.centred, words, "specific"))
    studied_u, every_u = read_side(loaded, t.rows)

    def explain_u():
        pos, neg = poles_map(studied_u), poles_map(-studied_u)
        population = torch.cat([poles_map(every_u), poles_map(-every_u)])
        codes = harness.code("specific", pos, dictionary.centred, population)
        negc = harness.code("specific", neg, dictionary.centred, population)
        top_pos, sets_pos = harness.top_words(codes, words)
        top_neg, _ = harness.top_words(negc, words)
        return harness.Explained(top_pos, top_neg, sets_pos, codes, pos, population)

    add("(i) read side", "explain u_j (what the vector reads) through the poles map", explain_u)
    log("  levers: done")
    return rows
