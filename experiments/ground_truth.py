"""Explanations against ground truth on the testbed: one command, tables (markdown + JSON) and plots.

    nice .venv/bin/python experiments/ground_truth.py [--model testbed-main] [--model testbed-small]
        [--n 1500] [--per-head 8] [--out experiments/ground_truth]

For every singular vector (the ``--per-head`` strongest of every head of every layer) the truth
comes from the data (``ground_truth_data``: η² of each factor on the head's CLS write projected on
the vector; truth = argmax factor when η² >= 0.2; ±pole = the value with the most positive /
negative mean activation). Every explanation setting (vocabulary × image mean / map × coder) is
then scored on the vectors that carry a factor:

* factor / value: the top-1 concept of +v names the truth's factor / its +pole value;
* −pole: the top-1 concept of −v names the −pole value;
* in-K: the +pole value is anywhere among the K concepts;
* distractor: the top-1 concept names no factor value;
* precision per named factor: of the vectors whose top-1 names factor F, the share whose truth is F;
* chance: the same agreement with the truth shuffled across vectors (mean of 200 permutations).

Settings are compared on the VALIDATION seed; the chosen default and the before/after table are
reported on the TEST seed, which nothing is tuned on. The confidence calibration (see
``sith.engine.analysis.explanation_confidence``) is fitted on validation and its reliability curve
checked on test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ground_truth_data import TEST_SEED, VALIDATION_SEED, Truth, WorldActivations, cached_collect, ground_truth  # noqa: E402

from sith.engine.analysis import DEFAULT_SHARED_DIRECTIONS, remove_shared, shared_directions  # noqa: E402
from sith.engine.decomposition import decompose_layer  # noqa: E402
from sith.engine.dictionary import build_dictionary  # noqa: E402
from sith.engine.jointspace import JointSpace, directions_mean, null_image_mean, poles_mean  # noqa: E402
from sith.engine.models import load_reference  # noqa: E402
from sith.engine.sparse import SparseCodes, atom_statistics, encode  # noqa: E402
from sith.testbed.vocabulary import testbed_vocabulary, word_values  # noqa: E402

HERE = Path(__file__).resolve().parent
K = 5
PERMUTATIONS = 200
CODERS = ("comp", "nnomp", "topk", "specific")


# ----------------------------------------------------------------------------- model pieces


@dataclass
class Tower:
    """The vectors under study and the whole tower's vectors (for means and specificity)."""

    loaded: object
    layers: list[int]
    rows: list[tuple[int, int, int]]  # (layer, head, j) of each studied vector
    vectors: Tensor  # [V, d] studied right singular vectors
    sigma: Tensor  # [V]
    all_vectors: dict[int, Tensor]  # layer -> [H·r, d] every vector, head-major


def tower(loaded, per_head: int) -> Tower:
    blocks = loaded.model.visual.transformer.resblocks
    rows, vectors, sigma, every = [], [], [], {}
    for layer, block in enumerate(blocks):
        svd = decompose_layer(block, loaded.info.heads, layer)
        every[layer] = svd.V.transpose(1, 2).reshape(-1, svd.V.shape[1]).float()
        for head in range(loaded.info.heads):
            for j in range(min(per_head, svd.S.shape[1])):
                rows.append((layer, head, j))
                vectors.append(svd.V[head, :, j].float())
                sigma.append(float(svd.S[head, j]))
    return Tower(loaded, list(range(len(blocks))), rows, torch.stack(vectors), torch.tensor(sigma), every)


def studied_activations(t: Tower, data: WorldActivations) -> Tensor:
    """[N, V] activation of every studied vector."""
    return torch.stack([data.activations[layer][:, head, j] for layer, head, j in t.rows], dim=1)


# ----------------------------------------------------------------------------- maps (image means)


def linear_map(loaded):
    """Differential read-out: normalise((γ_p ⊙ v) P), i.e. ln_post's Jacobian direction without its bias."""
    visual = loaded.model.visual
    gamma = visual.ln_post.weight.detach().float()
    proj = visual.proj.detach().float()

    def apply(vectors: Tensor) -> Tensor:
        return F.normalize((vectors.float() * gamma) @ proj, dim=-1)

    return apply


def shared_removed(loaded, mapping, count: int = DEFAULT_SHARED_DIRECTIONS):
    """``mapping`` followed by the engine's removal of the tower's ``count`` shared directions (the
    top principal directions of both poles of every mapped vector of every layer;
    ``sith.engine.analysis.coding_targets``)."""
    blocks = loaded.model.visual.transformer.resblocks
    every = torch.cat([decompose_layer(block, loaded.info.heads, layer).V.transpose(1, 2).reshape(-1, loaded.info.width)
                       for layer, block in enumerate(blocks)]).float()
    basis = shared_directions(torch.cat([mapping(every), mapping(-every)]), count)

    def apply(vectors: Tensor) -> Tensor:
        return remove_shared(mapping(vectors), basis)

    return apply


def maps_for(loaded, real_mean: Tensor) -> dict[str, object]:
    """Name -> callable [V, d] -> [V, D]: every image-mean candidate plus the differential map and
    the default "poles" mean with the tower's shared directions removed ("poles-shared")."""
    space = lambda mean: JointSpace.for_model(loaded, mean).map  # noqa: E731
    poles = space(poles_mean(loaded))
    return {
        "none": space(None),
        "directions": space(directions_mean(loaded)),
        "poles": poles,
        "poles-shared": shared_removed(loaded, poles),
        "null-images": space(null_image_mean(loaded)),
        "real": space(real_mean),
        "linear": linear_map(loaded),
    }


def pushforward_jacobians(loaded, images: Tensor) -> dict[int, Tensor]:
    """Layer -> mean Jacobian [D, d] of the unit image embedding with respect to a direction added
    to every token's residual right after layer l's attention (where the heads write), averaged
    over ``images``. With synthetic null images (``null_images``) this is a data-free linear
    push-forward through the later blocks (attention, MLPs, ln_post, proj, normalisation); one
    backward pass per output dimension serves every layer at once."""
    model = loaded.model
    blocks = model.visual.transformer.resblocks
    deltas = [torch.zeros(1, 1, loaded.info.width, requires_grad=True) for _ in blocks]
    handles = [block.ls_1.register_forward_hook(lambda m, i, o, d=delta: o + d) for block, delta in zip(blocks, deltas)]
    try:
        with torch.enable_grad():
            emb = model.encode_image(images, normalize=True)
            rows: list[list[Tensor]] = [[] for _ in blocks]
            for k in range(emb.shape[1]):
                grads = torch.autograd.grad(emb[:, k].sum(), deltas, retain_graph=k + 1 < emb.shape[1])
                for layer, g in enumerate(grads):
                    rows[layer].append(g.reshape(-1))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.stack(r) / images.shape[0] for layer, r in enumerate(rows)}


def pushforward_map(loaded):
    """Data-free layer-aware map (beyond the paper): v of layer l -> normalise(J_l v) with J_l the
    null-image push-forward Jacobian of that layer. Needs to know each vector's layer, so it takes
    (vectors, layers)."""
    from sith.engine.jointspace import _preprocess_stats, null_images

    mean, std, size = _preprocess_stats(loaded)
    images = (null_images(size) - mean[:, None, None]) / std[:, None, None]
    jac = pushforward_jacobians(loaded, images)

    def apply(vectors: Tensor, layers: list[int]) -> Tensor:
        stacked = torch.stack([jac[layer] for layer in layers])  # [V, D, d]
        return F.normalize(torch.einsum("vDd,vd->vD", stacked, vectors.float()), dim=-1)

    return apply


def oracle_directions(acts: Tensor, embeddings: Tensor) -> Tensor:
    """[V, D]: the data-driven read-out of each vector, the regression slope of the image embedding
    on its activation (what a perfect data-free map would have to produce; a ceiling, not a candidate)."""
    a = acts.double() - acts.double().mean(0)
    e = embeddings.double() - embeddings.double().mean(0)
    return F.normalize((a.T @ e).float(), dim=-1)


# ----------------------------------------------------------------------------- coding


def specific_scores(targets: Tensor, atoms: Tensor, population: Tensor) -> Tensor:
    """Cosines standardised per atom over a population of targets (z-scores): an atom close to
    every direction of the tower (a hub) gains nothing from being close to this one."""
    pop = population @ atoms.T
    return (targets @ atoms.T - pop.mean(0)) / pop.std(0).clamp_min(1e-6)


def code(coder: str, targets: Tensor, atoms: Tensor, population: Tensor) -> SparseCodes:
    """The engine's coders; ``specific`` standardises over ``population`` (the tower's ±directions)."""
    stats = atom_statistics(population, atoms) if coder == "specific" else None
    return encode(coder, targets, atoms, k=K, stats=stats)


# ----------------------------------------------------------------------------- scoring


def named(word: str | None) -> tuple[str | None, str | None]:
    return word_values().get(word, (None, None)) if word else (None, None)


def top_words(codes: SparseCodes, words: list[str]) -> tuple[list[str | None], list[list[str]]]:
    tops, sets = [], []
    for idx, coef in zip(codes.indices.tolist(), codes.coefficients.tolist()):
        kept = [words[i] for i, c in zip(idx, coef) if c > 0]
        tops.append(kept[0] if kept else None)
        sets.append(kept)
    return tops, sets


def agreement(top_pos, top_neg, sets_pos, truth: Truth, rows: list[int]) -> dict[str, float]:
    """Scores over ``rows`` (indices of vectors that carry a factor)."""
    n = max(1, len(rows))
    fac = [named(top_pos[i])[0] == truth.factor[i] for i in rows]
    val = [named(top_pos[i]) == (truth.factor[i], truth.positive[i]) for i in rows]
    neg = [named(top_neg[i]) == (truth.factor[i], truth.negative[i]) for i in rows]
    ink = [any(named(w) == (truth.factor[i], truth.positive[i]) for w in sets_pos[i]) for i in rows]
    dis = [top_pos[i] is not None and named(top_pos[i])[0] is None for i in rows]
    return {"n": len(rows), "factor": sum(fac) / n, "value": sum(val) / n, "neg_value": sum(neg) / n,
            "in_k": sum(ink) / n, "distractor": sum(dis) / n}


def precision(top_pos, truth: Truth, rows: list[int]) -> dict[str, dict[str, float]]:
    """Per named factor: how often the named factor (and value) is the truth, over the ``rows``."""
    named_rows: dict[str, list[int]] = {}
    for i in rows:
        factor = named(top_pos[i])[0]
        named_rows.setdefault(factor or "(distractor)", []).append(i)
    out = {}
    for factor, items in sorted(named_rows.items()):
        right = sum(truth.factor[i] == factor for i in items)
        value = sum(named(top_pos[i]) == (truth.factor[i], truth.positive[i]) for i in items)
        out[factor] = {"named": len(items), "factor_right": right / len(items), "value_right": value / len(items)}
    return out


def chance(top_pos, truth: Truth, rows: list[int], seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    fac = val = 0.0
    for _ in range(PERMUTATIONS):
        perm = torch.randperm(len(rows), generator=gen).tolist()
        for i, p in zip(rows, perm):
            j = rows[p]
            got = named(top_pos[i])
            fac += got[0] == truth.factor[j]
            val += got == (truth.factor[j], truth.positive[j])
    denom = PERMUTATIONS * max(1, len(rows))
    return {"factor": fac / denom, "value": val / denom}


# ----------------------------------------------------------------------------- one split


@dataclass
class Explained:
    top_pos: list[str | None]
    top_neg: list[str | None]
    sets_pos: list[list[str]]
    codes: SparseCodes
    targets: Tensor
    population: Tensor


def explain_all(t: Tower, mapping, atoms: Tensor, words: list[str], coder: str) -> Explained:
    every = torch.cat([t.all_vectors[layer] for layer in t.layers])
    if getattr(mapping, "layer_aware", False):
        studied = [row[0] for row in t.rows]
        every_layers = [layer for layer in t.layers for _ in range(t.all_vectors[layer].shape[0])]
        pos_t, neg_t = mapping(t.vectors, studied), mapping(-t.vectors, studied)
        population = torch.cat([mapping(every, every_layers), mapping(-every, every_layers)])
    else:
        pos_t, neg_t = mapping(t.vectors), mapping(-t.vectors)
        population = torch.cat([mapping(every), mapping(-every)])
    codes = code(coder, pos_t, atoms, population)
    neg = code(coder, neg_t, atoms, population)
    top_pos, sets_pos = top_words(codes, words)
    top_neg, _ = top_words(neg, words)
    return Explained(top_pos, top_neg, sets_pos, codes, pos_t, population)


def layer_rows(t: Tower, truth: Truth, layers: list[int]) -> list[int]:
    return [i for i in truth.carrying if t.rows[i][0] in layers]


def score_setting(t: Tower, ex: Explained, truth: Truth) -> dict:
    last4 = t.layers[-4:]
    everything = truth.carrying
    result = {
        "all": agreement(ex.top_pos, ex.top_neg, ex.sets_pos, truth, everything),
        "last4": agreement(ex.top_pos, ex.top_neg, ex.sets_pos, truth, layer_rows(t, truth, last4)),
        "per_layer": {str(l): {k: v for k, v in agreement(ex.top_pos, ex.top_neg, ex.sets_pos, truth,
                                                          layer_rows(t, truth, [l])).items() if k in ("n", "factor", "value")}
                      for l in t.layers},
        "precision": precision(ex.top_pos, truth, everything),
        "distractor_all_vectors": sum(named(w)[0] is None and w is not None for w in ex.top_pos) / len(ex.top_pos),
    }
    return result


# ----------------------------------------------------------------------------- confidence


def confidence_records(ex: Explained, atoms: Tensor, truth: Truth) -> tuple[Tensor, Tensor]:
    """Features of every studied vector's explanation and whether its top-1 names the +pole value
    (vectors carrying no factor count as wrong: any value named for them is wrong)."""
    from sith.engine.analysis import explanation_features

    feats = explanation_features(ex.codes, ex.targets, atoms, atom_statistics(ex.population, atoms))
    right = torch.tensor([named(ex.top_pos[i]) == (truth.factor[i], truth.positive[i]) if truth.factor[i] else False
                          for i in range(len(ex.top_pos))], dtype=torch.float32)
    return feats, right


def fit_confidence(features: Tensor, right: Tensor, steps: int = 3000) -> tuple[list[float], float]:
    """Logistic regression with non-negative weights (projected gradient), so confidence is monotone
    in every feature."""
    w = torch.zeros(features.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(features @ w + b, right)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w.clamp_(min=0)
    return [round(float(x), 4) for x in w.detach()], round(float(b.detach()), 4)


def reliability(confidence: Tensor, right: Tensor, bins: int = 5) -> list[dict[str, float]]:
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        mask = (confidence >= lo) & ((confidence < hi) | (hi == 1.0))
        if mask.any():
            out.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": int(mask.sum()), "confidence": float(confidence[mask].mean()),
                        "accuracy": float(right[mask].mean())})
    return out


def expected_calibration_error(confidence: Tensor, right: Tensor, bins: int = 5) -> float:
    table = reliability(confidence, right, bins)
    n = sum(r["n"] for r in table)
    return sum(r["n"] * abs(r["confidence"] - r["accuracy"]) for r in table) / max(1, n)


# ----------------------------------------------------------------------------- driver


VOCABULARIES = {
    "world+200 English (before)": lambda: testbed_vocabulary(english=200),
    "world only": lambda: testbed_vocabulary(english=0, learnt=False),
    "world+learnt (default)": lambda: testbed_vocabulary(),
}
BEFORE = ("world+200 English (before)", "directions", "comp")
PREVIOUS = ("world+learnt (default)", "poles", "specific")  # the default before the shared directions went
DEFAULT = ("world+learnt (default)", "poles-shared", "specific")
MAPS = ("none", "directions", "poles", "poles-shared", "null-images", "real", "linear", "pushforward", "oracle")


def _explain(t: Tower, maps: dict, oracle: Tensor, map_name: str, atoms: Tensor, words: list[str], coder: str) -> Explained:
    if map_name == "oracle":
        return explain_oracle(t, oracle, atoms, words, coder)
    return explain_all(t, maps[map_name], atoms, words, coder)


def run_model(name: str, n: int, per_head: int, quick: bool = False, log=print) -> dict:
    """Every setting on both splits of one model (see the module docstring)."""
    torch.set_num_threads(1)
    loaded = load_reference(name)
    t = tower(loaded, per_head)
    started = time.time()
    splits = {"validation": cached_collect(loaded, VALIDATION_SEED, n), "test": cached_collect(loaded, TEST_SEED, n)}
    log(f"[{name}] activations for {n} images x 2 splits in {time.time() - started:.0f} s")
    real_mean = splits["validation"].embeddings.mean(0)
    maps = maps_for(loaded, real_mean)
    if not quick:
        push = pushforward_map(loaded)
        push.layer_aware = True  # type: ignore[attr-defined]
        maps["pushforward"] = push
        log(f"[{name}] null-image push-forward Jacobians ({time.time() - started:.0f} s)")
    truths = {s: ground_truth(studied_activations(t, d), d.labels) for s, d in splits.items()}
    oracles = {s: oracle_directions(studied_activations(t, d), d.embeddings) for s, d in splits.items()}
    vocabs = {v: build_dictionary(loaded, make()) for v, make in VOCABULARIES.items()}
    coders = ("comp", "specific") if quick else CODERS
    map_names = ("directions", "poles", "poles-shared", "oracle") if quick else MAPS
    results: dict = {"model": name, "n_images": n, "per_head": per_head, "vectors": len(t.rows),
                     "layers": len(t.layers), "seeds": {"validation": VALIDATION_SEED, "test": TEST_SEED},
                     "truth": {}, "settings": [], "mean_agreement": {}}
    for split, truth in truths.items():
        results["truth"][split] = {"carrying": len(truth.carrying),
                                   "factors": dict(Counter(f for f in truth.factor if f))}
    # Data-free image means against the real one (issue 11 item 5): cosine of the means, and top-1
    # agreement of COMP explanations under each candidate with those under the real mean.
    default_vocab = vocabs[DEFAULT[0]]
    real_top = explain_all(t, maps["real"], default_vocab.centred, default_vocab.concepts, "comp").top_pos
    candidates = {"directions": directions_mean(loaded), "poles": poles_mean(loaded),
                  "null-images": null_image_mean(loaded)}
    for mean_name, mean in candidates.items():
        top = explain_all(t, maps[mean_name], default_vocab.centred, default_vocab.concepts, "comp").top_pos
        results["mean_agreement"][mean_name] = {
            "cosine_to_real": float(F.cosine_similarity(mean, real_mean, dim=0)),
            "top1_same_as_real": sum(a == b for a, b in zip(top, real_top)) / len(top)}
    every = torch.cat(list(t.all_vectors.values()))
    other_sign = JointSpace.for_model(loaded, None).project(-every).double().mean(0).float()
    results["mean_agreement"]["directions"]["cosine_to_other_sign"] = float(
        F.cosine_similarity(candidates["directions"], other_sign, dim=0))
    for vocab_name, dictionary in vocabs.items():
        atoms, words = dictionary.centred, dictionary.concepts
        for map_name in map_names:
            for coder in coders:
                setting = (vocab_name, map_name, coder)
                if quick and setting not in (BEFORE, PREVIOUS, DEFAULT) and vocab_name != DEFAULT[0]:
                    continue
                row = {"vocabulary": vocab_name, "map": map_name, "coder": coder}
                for split, truth in truths.items():
                    ex = _explain(t, maps, oracles[split], map_name, atoms, words, coder)
                    row[split] = score_setting(t, ex, truth)
                    row[split]["chance"] = chance(ex.top_pos, truth, truth.carrying)
                results["settings"].append(row)
        log(f"[{name}] {vocab_name}: done ({time.time() - started:.0f} s)")
    from ground_truth_levers import measure_levers  # the levers cost seconds: quick runs (tests) measure them too

    results["levers"] = measure_levers(sys.modules[__name__], loaded, t, maps["poles"], default_vocab, truths,
                                       log=lambda msg: log(f"[{name}]{msg} ({time.time() - started:.0f} s)"))
    # Confidence: features and correctness of the default explanations on each split.
    results["confidence"] = {}
    for split, truth in truths.items():
        ex = _explain(t, maps, oracles[split], DEFAULT[1], default_vocab.centred, default_vocab.concepts, DEFAULT[2])
        feats, right = confidence_records(ex, default_vocab.centred, truth)
        results["confidence"][split] = {
            "features": feats.tolist(), "right": right.tolist(),
            "named": [named(w)[0] or "(distractor)" for w in ex.top_pos],
            "factor_right": [named(w)[0] is not None and named(w)[0] == f for w, f in zip(ex.top_pos, truth.factor)]}
    return results


def confidence_report(results: dict, fit_model: str) -> dict:
    """Fit on ``fit_model``'s validation split; reliability of the engine's shipped weights (and of
    the new fit) on every model's test split."""
    from sith.engine.analysis import CONFIDENCE_BIAS, CONFIDENCE_WEIGHTS, explanation_confidence

    val = results[fit_model]["confidence"]["validation"]
    weights, bias = fit_confidence(torch.tensor(val["features"]), torch.tensor(val["right"]))
    report = {"fit_on": f"{fit_model} validation", "fitted_weights": weights, "fitted_bias": bias,
              "shipped_weights": list(CONFIDENCE_WEIGHTS), "shipped_bias": CONFIDENCE_BIAS, "models": {}}
    for model, r in results.items():
        for split in ("validation", "test"):
            data = r["confidence"][split]
            feats, right = torch.tensor(data["features"]), torch.tensor(data["right"])
            conf = explanation_confidence(feats)
            report["models"].setdefault(model, {})[split] = {
                "reliability": reliability(conf, right), "ece": expected_calibration_error(conf, right),
                "mean_confidence": float(conf.mean()), "accuracy": float(right.mean()),
                "ece_fitted": expected_calibration_error(explanation_confidence(feats, weights, bias), right),
                "confident": {str(th): _confident(conf, right, data["named"], data["factor_right"], th)
                              for th in CONFIDENT_THRESHOLDS}}
    return report


CONFIDENT_THRESHOLDS = (0.3, 0.4, 0.5)


def _confident(conf: Tensor, right: Tensor, named_factor: list[str], factor_right: list[bool], threshold: float) -> dict:
    """What a user who hides explanations below ``threshold`` sees: coverage, value accuracy and
    the precision of every factor that is still named."""
    keep = [i for i in range(len(named_factor)) if float(conf[i]) >= threshold]
    per: dict[str, list[bool]] = {}
    for i in keep:
        per.setdefault(named_factor[i], []).append(bool(factor_right[i]))
    return {"kept": len(keep), "of": len(named_factor),
            "value_right": float(right[keep].mean()) if keep else 0.0,
            "precision": {f: {"named": len(v), "factor_right": sum(v) / len(v)} for f, v in sorted(per.items())}}


# ----------------------------------------------------------------------------- outputs


def _find(results: dict, setting: tuple[str, str, str]) -> dict:
    return next(r for r in results["settings"] if (r["vocabulary"], r["map"], r["coder"]) == setting)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def tables(results: dict, confidence: dict) -> str:
    lines = ["# Explanations against ground truth (generated by experiments/ground_truth.py)", ""]
    for model, r in results.items():
        lines += [f"## {model}", "",
                  f"{r['n_images']} images per split (validation seed {r['seeds']['validation']}, test seed "
                  f"{r['seeds']['test']}); the {r['per_head']} strongest vectors of every head of every layer "
                  f"({r['vectors']} vectors). Vectors carrying a factor (η² ≥ 0.2): "
                  + "; ".join(f"{s} {v['carrying']} ({', '.join(f'{f} {c}' for f, c in sorted(v['factors'].items()))})"
                              for s, v in r["truth"].items()), ""]
        before, previous, default = _find(r, BEFORE), _find(r, PREVIOUS), _find(r, DEFAULT)
        best_oracle = max((x for x in r["settings"] if x["map"] == "oracle"), key=lambda x: x["validation"]["all"]["value"])
        lines += ["### Before / after (TEST seed, % of factor-carrying vectors; chance in brackets)", "",
                  "| setting | factor | value | value, last 4 | −pole value | right value in K | distractor top-1 |",
                  "|---|---|---|---|---|---|---|"]
        for label, row in (("before: world+200 English, directions mean, COMP", before),
                           ("previous default: world+learnt, poles mean, specific", previous),
                           ("after (default): world+learnt, poles mean, shared directions removed, specific", default),
                           (f"ceiling: oracle read-out ({best_oracle['vocabulary']}, {best_oracle['coder']})", best_oracle)):
            a, c = row["test"]["all"], row["test"]["chance"]
            lines.append(f"| {label} | {_pct(a['factor'])} ({_pct(c['factor'])}) | {_pct(a['value'])} ({_pct(c['value'])}) | "
                         f"{_pct(row['test']['last4']['value'])} | {_pct(a['neg_value'])} | {_pct(a['in_k'])} | {_pct(a['distractor'])} |")
        lines += ["", "Per layer, value agreement (test): " + "; ".join(
            f"{label} " + " ".join(f"L{l} {_pct(v['value'])}" for l, v in row["test"]["per_layer"].items())
            for label, row in (("before", before), ("previous", previous), ("after", default), ("oracle", best_oracle))), ""]
        lines += ["Precision per named factor (test, after): " + "; ".join(
            f"{f} {v['factor_right']:.2f} of {v['named']}" for f, v in default["test"]["precision"].items()),
            "Precision per named factor (test, previous default): " + "; ".join(
            f"{f} {v['factor_right']:.2f} of {v['named']}" for f, v in previous["test"]["precision"].items()),
            "Precision per named factor (test, before): " + "; ".join(
            f"{f} {v['factor_right']:.2f} of {v['named']}" for f, v in before["test"]["precision"].items()), ""]
        lines += ["### Every setting (value agreement %, all layers / last four)", "",
                  "| vocabulary | map / image mean | coder | val all | val last 4 | test all | test last 4 | test factor | test distractor |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in r["settings"]:
            v, t = row["validation"], row["test"]
            lines.append(f"| {row['vocabulary']} | {row['map']} | {row['coder']} | {_pct(v['all']['value'])} | "
                         f"{_pct(v['last4']['value'])} | {_pct(t['all']['value'])} | {_pct(t['last4']['value'])} | "
                         f"{_pct(t['all']['factor'])} | {_pct(t['all']['distractor'])} |")
        if r.get("levers"):
            lines += ["", "### Levers beyond the grid (`ground_truth_levers.py`; specific coder, world+learnt vocabulary)", "",
                      "Value agreement %; choose on validation, read test. Precision: share of the vectors named by "
                      "a shape / colour word whose truth is that factor (test).", "",
                      "| lever | setting | val all | val last 4 | val factor | test all | test last 4 | test factor | "
                      "shape precision | colour precision |", "|---|---|---|---|---|---|---|---|---|---|"]
            for row in r["levers"]:
                v, t = row["validation"], row["test"]
                prec = lambda f: (f"{t['precision'][f]['factor_right']:.2f} of {t['precision'][f]['named']}"  # noqa: E731
                                  if f in t["precision"] else "–")
                lines.append(f"| {row['lever']} | {row['setting']} | {_pct(v['all']['value'])} | {_pct(v['last4']['value'])} | "
                             f"{_pct(v['all']['factor'])} | {_pct(t['all']['value'])} | {_pct(t['last4']['value'])} | "
                             f"{_pct(t['all']['factor'])} | {prec('shape')} | {prec('colour')} |")
        lines += ["", "### Data-free image means against the real image mean (validation images)", "",
                  "| candidate | cosine to the real mean | COMP top-1 same as with the real mean |", "|---|---|---|"]
        for name, m in r["mean_agreement"].items():
            lines.append(f"| {name} | {m['cosine_to_real']:.3f} | {_pct(m['top1_same_as_real'])} % |")
        if "cosine_to_other_sign" in r["mean_agreement"].get("directions", {}):
            lines.append(f"\n'directions' taken with the other sign convention has cosine "
                         f"{r['mean_agreement']['directions']['cosine_to_other_sign']:.3f} to itself.")
        lines.append("")
    lines += ["## Confidence", "",
              f"Shipped weights {confidence['shipped_weights']} bias {confidence['shipped_bias']} "
              f"(features: top-1 coefficient, specificity z, cosine, margin); a fresh fit on "
              f"{confidence['fit_on']} gives {confidence['fitted_weights']} bias {confidence['fitted_bias']}.", "",
              "| model | split | mean confidence | accuracy | ECE | reliability (bin: n, confidence → accuracy) |",
              "|---|---|---|---|---|---|"]
    for model, splits in confidence["models"].items():
        for split, c in splits.items():
            bins = "; ".join(f"{b['bin']}: {b['n']}, {b['confidence']:.2f} → {b['accuracy']:.2f}" for b in c["reliability"])
            lines.append(f"| {model} | {split} | {c['mean_confidence']:.2f} | {c['accuracy']:.2f} | {c['ece']:.3f} | {bins} |")
    lines += ["", "### Hiding unsure explanations (TEST seed, `--min-confidence`)", "",
              "| model | min confidence | kept | top-1 value right | precision of each named factor |", "|---|---|---|---|---|"]
    for model, splits in confidence["models"].items():
        for th, c in splits["test"]["confident"].items():
            prec = "; ".join(f"{f} {v['factor_right']:.2f} of {v['named']}" for f, v in c["precision"].items())
            lines.append(f"| {model} | {th} | {c['kept']} of {c['of']} | {100 * c['value_right']:.0f} % | {prec} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, confidence: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4))
    for ax, model in zip(axes, models):
        r = results[model]
        best_oracle = max((x for x in r["settings"] if x["map"] == "oracle"), key=lambda x: x["validation"]["all"]["value"])
        for label, row, style in (("before", _find(r, BEFORE), "o--"), ("previous default", _find(r, PREVIOUS), "d-."),
                                  ("after (default)", _find(r, DEFAULT), "s-"),
                                  ("oracle read-out", best_oracle, "^:")):
            layers = list(row["test"]["per_layer"])
            ax.plot([int(x) for x in layers], [row["test"]["per_layer"][x]["value"] for x in layers], style, label=label)
        ax.set_xticks(range(r["layers"]))
        ax.set_title(f"{model}: top-1 value agreement (test)")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.legend()
    ax = axes[-1]
    for model, splits in confidence["models"].items():
        bins = splits["test"]["reliability"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=f"{model} test")
    ax.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    ax.set_title("confidence reliability (test)")
    ax.set_xlabel("confidence")
    ax.set_ylabel("share right")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explain_oracle(t: Tower, directions: Tensor, atoms: Tensor, words: list[str], coder: str) -> Explained:
    population = torch.cat([directions, -directions])
    codes = code(coder, directions, atoms, population)
    neg = code(coder, -directions, atoms, population)
    top_pos, sets_pos = top_words(codes, words)
    top_neg, _ = top_words(neg, words)
    return Explained(top_pos, top_neg, sets_pos, codes, directions, population)


def _rounded(value, digits: int = 4):
    """Floats rounded for the JSON file (it is committed; 4 digits is below the sampling noise)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="testbed model (repeatable; default both shipped ones)")
    parser.add_argument("--n", type=int, default=1500, help="images per split")
    parser.add_argument("--per-head", type=int, default=8, help="strongest vectors per head studied")
    parser.add_argument("--out", type=Path, default=HERE / "ground_truth")
    parser.add_argument("--quick", action="store_true", help="fewer settings (tests)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    models = args.model or ["testbed-main", "testbed-small"]
    results = {m: run_model(m, args.n, args.per_head, args.quick) for m in models}
    confidence = confidence_report(results, models[0])
    print(f"confidence fit on {confidence['fit_on']}: weights {confidence['fitted_weights']} bias {confidence['fitted_bias']}")
    slim = {m: {k: v for k, v in r.items() if k != "confidence"} for m, r in results.items()}
    (args.out / "results.json").write_text(json.dumps(_rounded({"models": slim, "confidence": confidence}),
                                                      separators=(",", ":")) + "\n", encoding="utf-8")
    (args.out / "tables.md").write_text(tables(results, confidence), encoding="utf-8")
    plot(results, confidence, args.out / "agreement.png")
    print(f"wrote {args.out}/results.json, tables.md, agreement.png")
    return {"results": results, "confidence": confidence}


if __name__ == "__main__":
    main()
