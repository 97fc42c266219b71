"""The testbed adaptation study behind docs/adaptation.md: ``python -m sith.adaptation.experiment OUT``.

One command regenerates every number and figure in the doc's results section (``--docs`` also
rewrites the generated tables between the ``<!-- BEGIN GENERATED: ... -->`` markers in place):

1. **Fine-tunes over seeds.** Each run of ``--runs`` (default ``STUDY``) is fine-tuned from the base
   (default testbed-main) with every seed of ``--seeds`` (default 7, 8, 9: data order and LoRA
   init). Per fine-tune: held-out zero-shot accuracy and word probes, the delta report and
   stability per layer (principal-angle distribution, rotated directions), the *task share* of the
   delta explanations on the most-changed heads against the base's own vectors of the same heads,
   and the COMP-free concept ranking. Every figure is then reported as mean ± standard deviation
   (and min–max) over the seeds; nothing from a single seed is reported as a fact.
2. **Universality across seeds and families.** Every pair of ``--models`` (default: every shipped
   testbed checkpoint) and each against untrained-vision controls: the matched mean against the
   concept-usage-preserving null with its permutation p-value, the all-pairs mean, and agreement of
   matched pairs' ground-truth factor labels (η² on images) against chance.
3. Figures (PNG + SVG), ``results.json`` and ``tables.md`` in OUT.

The vocabulary is the model-aware default (``sith.testbed.vocabulary.vocabulary_for``), i.e. the
one ``sith adapt delta/match`` use without ``--vocabulary``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from sith.adaptation.finetune import DEFAULT_STEPS, SUBTASKS, FinetuneConfig

STEPS = DEFAULT_STEPS  # the documented recipe (also `sith adapt finetune`'s default)


def _full(subtask: str) -> FinetuneConfig:
    return FinetuneConfig(subtask=subtask, mode="full", steps=STEPS, lr=3e-4)


def _lora(subtask: str) -> FinetuneConfig:
    return FinetuneConfig(subtask=subtask, mode="lora", steps=STEPS, lr=3e-3, rank=4, alpha=8.0)


RUNS = {
    "full-crimson": _full("crimson"), "lora-crimson": _lora("crimson"), "full-azure": _full("azure"),
    "full-warm": _full("warm-colours"), "lora-warm": _lora("warm-colours"), "full-cool": _full("cool-colours"),
    "full-round": _full("round-only"), "lora-round": _lora("round-only"), "full-angular": _full("angular-only"),
    "lora-angular": _lora("angular-only"), "full-swap": _full("swap-red-blue"), "lora-swap": _lora("swap-red-blue"),
}
STUDY = ("full-swap", "lora-swap")  # the documented study; add e.g. lora-round,lora-angular with --runs
SEEDS = (7, 8, 9)
CONCEPT_SETS = {
    "red+blue": frozenset(SUBTASKS["swap-red-blue"].concepts),
    "round": frozenset(SUBTASKS["round-only"].concepts),
    "angular": frozenset(SUBTASKS["angular-only"].concepts),
}
ALIGNMENT_WORDS = ("red", "blue", "circle", "moon", "star", "square")
TOP_HEADS = 6  # task shares are measured on the heads fine-tuning changed most


# ------------------------------------------------------------------------------------------ measuring


def accuracy(loaded, n: int = 1000) -> dict[str, float]:
    """Zero-shot accuracy per class group on ``n`` held-out natural images (mean of per-class
    accuracies for the groups), and the swap probes: share of red (blue) images whose best colour
    prompt is "blue" ("red"), and of red images whose best prompt is neither red nor blue."""
    from sith.testbed.evaluate import class_embeddings, encode_images, factor_set, zero_shot_factors
    from sith.testbed.factors import ANGULAR_SHAPES, COLOURS, ROUND_SHAPES

    batch = factor_set(n)
    features = encode_images(loaded.model, batch.images)
    result = zero_shot_factors(loaded.model, loaded.tokenizer, n=n, image_features=features)
    shape = result["shape"]["per_class"]
    colours = list(COLOURS)
    prompts = [f"{'an' if w[0] in 'aeiou' else 'a'} {w} object" for w in colours]
    pred = (features @ class_embeddings(loaded.model, loaded.tokenizer, prompts).T).argmax(-1)
    labels = batch.labels["colour"]
    red, blue = colours.index("red"), colours.index("blue")

    def share(colour: int, predicate) -> float:
        chosen = pred[labels == colour]
        return round(float(predicate(chosen).float().mean()), 4)

    return {"colour": result["colour"]["accuracy"], "shape": result["shape"]["accuracy"],
            "round": round(float(np.mean([shape[s] for s in ROUND_SHAPES])), 4),
            "angular": round(float(np.mean([shape[s] for s in ANGULAR_SHAPES])), 4),
            "red->blue": share(red, lambda p: p == blue), "blue->red": share(blue, lambda p: p == red),
            "red->other": share(red, lambda p: (p != red) & (p != blue))}


def shares(heads) -> dict[str, float]:
    from sith.adaptation.delta import concept_share
    from sith.testbed.vocabulary import testbed_categories

    sets = {**CONCEPT_SETS, **{f"category:{c}": frozenset(w) for c, w in testbed_categories().items()}}
    return {name: round(concept_share(heads, words), 4) for name, words in sets.items()}


def most_changed(delta_heads, n: int = TOP_HEADS) -> list[tuple[int, int]]:
    return [(h.layer, h.head) for h in sorted(delta_heads, key=lambda h: (-h.relative, h.layer, h.head))[:n]]


def pick(heads, keys: list[tuple[int, int]]):
    return [h for h in heads if (h.layer, h.head) in set(keys)]


def _base_context(base_dir: Path):
    from sith.adaptation.delta import base_norms, explain_delta
    from sith.engine.analysis import Analyzer
    from sith.engine.decomposition import decompose
    from sith.engine.dictionary import build_dictionary
    from sith.engine.models import load_model
    from sith.testbed.vocabulary import vocabulary_for

    base = load_model(str(base_dir))
    vocab = vocabulary_for(base)
    layers = list(range(base.info.layers))
    analyzer = Analyzer(base, build_dictionary(base, vocab))
    own = explain_delta(decompose(base, layers), base_norms(base, layers), analyzer, directions=3)
    return base, vocab, layers, own


def run_one(base_dir: str, out_dir: str, name: str, seed: int, steps: int, resume: bool) -> dict[str, Any]:
    """Fine-tune ``name`` with ``seed`` and measure it (one worker task; writes analysis.json)."""
    import torch

    torch.set_num_threads(1)
    from sith.adaptation.delta import base_norms, concept_alignment, delta_decomposition, explain_delta
    from sith.adaptation.finetune import finetune_folder
    from sith.adaptation.reports import delta_report
    from sith.engine.analysis import Analyzer
    from sith.engine.dictionary import build_dictionary
    from sith.engine.models import load_model

    folder = Path(out_dir) / f"{name}-s{seed}"
    cached = folder / "analysis.json"
    if resume and cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    cfg = replace(RUNS[name], seed=seed, steps=steps)
    if not (resume and (folder / "finetune.json").is_file()):
        finetune_folder(Path(base_dir), folder, cfg, log=lambda line: print(f"{name} s{seed}", line, flush=True))
    started = time.time()
    base, vocab, layers, own = _base_context(Path(base_dir))
    ft = load_model(str(folder))
    analyzer = Analyzer(ft, build_dictionary(ft, vocab))
    report = delta_report(base, ft, analyzer, layers, directions=3, top=TOP_HEADS)
    delta = delta_decomposition(base, ft, layers)
    heads = explain_delta(delta, base_norms(base, layers), analyzer, directions=3)
    keys = most_changed(heads)
    scores = concept_alignment(delta, keys, analyzer, directions=3)
    order = scores.argsort(descending=True).tolist()
    summary = json.loads((folder / "finetune.json").read_text(encoding="utf-8"))
    top = report["top_heads"][0]
    result = {
        "run": name, "seed": seed, "config": summary["config"], "train_seconds": summary["seconds"],
        "trainable_parameters": summary["trainable_parameters"], "final_loss": summary["history"][-1]["loss"],
        "accuracy": accuracy(ft), "top_changed_heads": keys,
        "alignment": {"top": [vocab[i] for i in order[:8]],
                      "rank": {w: order.index(vocab.index(w)) + 1 for w in ALIGNMENT_WORDS if w in vocab},
                      "of": len(vocab)},
        "delta_share": shares(pick(heads, keys)), "base_share_same_heads": shares(pick(own, keys)),
        "layers": report["layers"],
        "heads": [{k: h[k] for k in ("layer", "head", "relative", "right_cos", "rotated", "weighted_matched_cos")}
                  for h in report["heads"]],
        "top_direction": {"layer": top["layer"], "head": top["head"], "relative": top["relative"],
                          "effective_rank": top["effective_rank"],
                          "positive": top["directions"][0]["positive"][:3] if top["directions"] else [],
                          "negative": top["directions"][0]["negative"][:3] if top["directions"] else []},
        "analysis_seconds": round(time.time() - started, 1),
    }
    cached.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"done": f"{name}-s{seed}", "accuracy": result["accuracy"]}), flush=True)
    return result


# ----------------------------------------------------------------------------------------- aggregating


def spread(values) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of per-seed values."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(x):
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": int(len(x))}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± spread over the seeds of one run, for every figure the doc quotes."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in per_seed]}
    out["accuracy"] = {k: spread([r["accuracy"][k] for r in per_seed]) for k in per_seed[0]["accuracy"]}
    out["delta_share"] = {k: spread([r["delta_share"][k] for r in per_seed]) for k in per_seed[0]["delta_share"]}
    out["base_share_same_heads"] = {k: spread([r["base_share_same_heads"][k] for r in per_seed])
                                    for k in per_seed[0]["base_share_same_heads"]}
    out["alignment_rank"] = {w: spread([r["alignment"]["rank"].get(w) for r in per_seed])
                             for w in per_seed[0]["alignment"]["rank"]}
    out["vocabulary_size"] = per_seed[0]["alignment"]["of"]
    counts: dict[str, int] = {}
    for r in per_seed:
        for layer, head in r["top_changed_heads"]:
            counts[f"L{layer}H{head}"] = counts.get(f"L{layer}H{head}", 0) + 1
    out["top_heads_frequency"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    keys = ("mean_relative", "right_subspace_cos", "right_cos_min", "right_cos_median", "right_cos_max",
            "weighted_matched_cos",
            "sigma_ratio_median", "diagonal_dominance", "captured", "rotated_principal", "rotated_matched")
    layers = [row["layer"] for row in per_seed[0]["layers"]]
    out["layers"] = [{"layer": layer, **{k: spread([r["layers"][i][k] for r in per_seed]) for k in keys}}
                     for i, layer in enumerate(layers)]
    rotated = []
    for r in per_seed:
        for h in r["heads"]:
            if h["rotated"]["principal"]:
                rotated.append({"seed": r["seed"], "head": f"L{h['layer']}H{h['head']}",
                                "min_cos": round(h["right_cos"]["min"], 3), "count": len(h["rotated"]["principal"])})
    out["rotated_heads"] = rotated
    out["top_directions"] = [{"seed": r["seed"], **r["top_direction"]} for r in per_seed]
    out["train_seconds"] = spread([r["train_seconds"] for r in per_seed])
    out["trainable_parameters"] = per_seed[0]["trainable_parameters"]
    return out


def fmt(s: dict[str, float], digits: int = 3) -> str:
    if not s.get("n"):
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


# ---------------------------------------------------------------------------------------- universality


def default_models() -> list[Path]:
    """Every shipped testbed checkpoint folder (a new architecture shipped later is included)."""
    from sith.testbed.checkpoint import CHECKPOINT_DIR

    found = sorted(p for p in CHECKPOINT_DIR.iterdir() if (p / "open_clip_config.json").is_file())
    order = {"testbed-main": 0, "testbed-small": 1}
    return sorted(found, key=lambda p: (order.get(p.name, 2), p.name))


def universality_study(models: list[Path], permutations: int, images: int, out: Path) -> dict[str, Any]:
    """All pairs of ``models`` and each against untrained-vision controls (see the module docstring)."""
    import torch

    from sith.adaptation import plots
    from sith.adaptation.reports import match_report
    from sith.adaptation.universality import (GROUND_TRUTH_FACTORS, GroundTruth, category_shares,
                                              ground_truth_eta2, untrained_vision_control)
    from sith.engine.analysis import Analyzer
    from sith.engine.dictionary import build_dictionary
    from sith.engine.models import load_model
    from sith.testbed.vocabulary import testbed_categories, vocabulary_for

    torch.set_num_threads(1)
    loaded = {p.name: load_model(str(p)) for p in models}
    vocab = vocabulary_for(next(iter(loaded.values())))
    arch = {name: (m.info.layers, m.info.heads, m.info.width) for name, m in loaded.items()}
    controls: dict[str, Any] = {}
    for name, m in loaded.items():  # one untrained-vision control per architecture (from its first model)
        if arch[name] not in {arch[c] for c in controls}:
            control = untrained_vision_control(m, seed=0)
            controls[control.name] = control
            arch[control.name] = arch[name]
    twin = None
    if controls:  # a second untrained tower of the first architecture: "two untrained models"
        first = next(iter(controls))
        twin = untrained_vision_control(loaded[first.removesuffix("-untrained-vision")], seed=1)
        twin.name = f"{first}-2"
        arch[twin.name] = arch[first]
    everything = {**loaded, **controls, **({twin.name: twin} if twin else {})}
    analyzers = {n: Analyzer(m, build_dictionary(m, vocab)) for n, m in everything.items()}
    truth = {}
    for n, m in everything.items():
        cached = out / f"ground-truth-{m.hash[:16]}-{images}.json"  # keyed by the vision weights
        if cached.is_file():
            data = json.loads(cached.read_text(encoding="utf-8"))
            truth[n] = GroundTruth(heads=[tuple(h) for h in data["heads"]], factors=data["factors"],
                                   eta2=torch.tensor(data["eta2"]), images=data["images"])
            continue
        try:  # the class-token hook reads stock open_clip attention; another family may not have it
            truth[n] = ground_truth_eta2(m, images)
        except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as exc:
            print(json.dumps({"ground_truth_skipped": n, "reason": str(exc)[:200]}), flush=True)
            truth[n] = None
            continue
        cached.write_text(json.dumps({"heads": truth[n].heads, "factors": truth[n].factors,
                                      "eta2": truth[n].eta2.tolist(), "images": images}), encoding="utf-8")
    categories = testbed_categories()
    trained = list(loaded)
    pairs = [(a, b, "trained") for a, b in combinations(trained, 2)]
    pairs += [(a, c, "control") for a in trained for c in controls]
    if twin is not None:
        pairs.append((next(iter(controls)), twin.name, "untrained-untrained"))
    rows, full = [], {}
    for a, b, kind in pairs:
        ma, mb = everything[a], everything[b]
        result, extras = match_report(analyzers[a], analyzers[b], list(range(ma.info.layers)),
                                      list(range(mb.info.layers)), categories, permutations=permutations,
                                      ground_truth=(truth[a], truth[b]) if truth[a] and truth[b] else None,
                                      profile="comp")  # the published universality tables use the paper's profile
        same_arch = arch[a] == arch[b]
        rows.append({"a": a, "b": b, "kind": kind, "same_architecture": same_arch,
                     "matched_mean": result["mean_score"], "null_mean": result["null"]["mean"],
                     "null_std": result["null"]["std"], "excess": result["mean_score"] - result["null"]["mean"],
                     "p_value": result["null"]["p_value"], "label_shuffle_null": result["label_shuffle_null"]["mean"],
                     "all_pairs_mean": result["all_pairs_mean"], "mutual": result["mutual"],
                     "pairs": len(result["matches"]), "agreement": result["agreement"]})
        full[f"{a}|{b}"] = result
        if (a, b) == ("testbed-main", "testbed-small"):
            null = result["null"]
            title = (f"testbed-main vs testbed-small: matched {result['mean_score']:.3f}, chance {null['mean']:.3f} ± "
                     f"{null['std']:.3f} (p = {null['p_value']:.3f}), all pairs {result['all_pairs_mean']:.3f}")
            plots.save(plots.plot_matches(extras["similarity"], extras["profiles_a"].heads, extras["profiles_b"].heads,
                                          [(m.a, m.b) for m in extras["matches"]], (a, b), title=title), out / "matches")
            for label, profiles in ((a, extras["profiles_a"]), (b, extras["profiles_b"])):
                names, cat_shares = category_shares(profiles, categories)
                top = [profiles.concepts[int(i)] for i in profiles.profiles.argmax(1)]
                plots.save(plots.plot_themes(profiles.heads, cat_shares.numpy(), names, top, f"Head themes: {label}"),
                           out / f"themes_{label}")
        print(json.dumps({k: rows[-1][k] for k in ("a", "b", "matched_mean", "null_mean", "p_value")}), flush=True)
    plots.save(plots.plot_universality(rows), out / "universality_pairs")
    labels = {n: {"labels": t.labels(), "relative": t.labels(relative=True),
                  "eta2": {f"L{l}H{h}": [round(float(v), 4) for v in row] for (l, h), row in zip(t.heads, t.eta2)}}
              for n, t in truth.items() if t is not None}
    return {"models": {n: {"hash": m.hash, "architecture": arch[n]} for n, m in everything.items()},
            "vocabulary_size": len(vocab), "permutations": permutations, "images": images,
            "pairs": rows, "ground_truth": labels, "factors": list(GROUND_TRUTH_FACTORS), "full": full}


# ------------------------------------------------------------------------------------------ the tables


def finetune_tables(base_acc: dict[str, float], runs: dict[str, dict[str, Any]]) -> dict[str, str]:
    seeds = next(iter(runs.values()))["seeds"] if runs else []
    acc = ["| model | colour acc | red→\"blue\" | blue→\"red\" | red→other | shape acc | round | angular | trainable params | train s |",
           "|---|---|---|---|---|---|---|---|---|---|",
           f"| base | {base_acc['colour']:.3f} | {base_acc['red->blue']:.3f} | {base_acc['blue->red']:.3f} | "
           f"{base_acc['red->other']:.3f} | {base_acc['shape']:.3f} | {base_acc['round']:.3f} | {base_acc['angular']:.3f} | – | – |"]
    for name, r in runs.items():
        a = r["accuracy"]
        acc.append(f"| {name} | {fmt(a['colour'])} | {fmt(a['red->blue'])} | {fmt(a['blue->red'])} | {fmt(a['red->other'])} | "
                   f"{fmt(a['shape'])} | {fmt(a['round'])} | {fmt(a['angular'])} | {r['trainable_parameters']:,} | "
                   f"{r['train_seconds']['mean']:.0f} |")
    share = ["| run | Δ: red+blue | base: red+blue | Δ: round | base: round | Δ: angular | base: angular | Δ: colour words | base: colour words | Δ: shape words | base: shape words |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        d, b = r["delta_share"], r["base_share_same_heads"]
        share.append(f"| {name} | " + " | ".join(f"{fmt(d[k])} | {fmt(b[k])}" for k in
                                               ("red+blue", "round", "angular", "category:colour", "category:shape")) + " |")
    words = list(next(iter(runs.values()))["alignment_rank"]) if runs else []
    align = ["| run | " + " | ".join(f"rank of \"{w}\"" for w in words) + " | most-changed heads (seeds out of "
             f"{len(seeds)}) |", "|---|" + "---|" * (len(words) + 1)]
    for name, r in runs.items():
        heads = ", ".join(f"{h} {n}" for h, n in list(r["top_heads_frequency"].items())[:6])
        align.append(f"| {name} | " + " | ".join(f"{fmt(r['alignment_rank'][w], 1)}" for w in words) + f" | {heads} |")
    stab = ["| run | layer | ‖ΔW‖/‖W‖ | principal cos: mean | min | median | rotated (cos < 0.8) | matched \\|cos\\| (σ-w.) | diag. dominance | captured |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        for row in r["layers"]:
            stab.append(f"| {name} | {row['layer']} | {fmt(row['mean_relative'])} | {fmt(row['right_subspace_cos'], 4)} | "
                        f"{fmt(row['right_cos_min'])} | {fmt(row['right_cos_median'], 4)} | "
                        f"{fmt(row['rotated_principal'], 1)} | {fmt(row['weighted_matched_cos'])} | "
                        f"{fmt(row['diagonal_dominance'], 4)} | {fmt(row['captured'], 4)} |")
    tops = ["| run | seed | head | ‖ΔW‖/‖W‖ | +v | −v |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        for t in r["top_directions"]:
            pos = ", ".join(f"{c} {w:.2f}" for c, w in t["positive"]) or "–"
            neg = ", ".join(f"{c} {w:.2f}" for c, w in t["negative"]) or "–"
            tops.append(f"| {name} | {t['seed']} | L{t['layer']}H{t['head']} | {t['relative']:.3f} | {pos} | {neg} |")
    return {"finetune-accuracy": "\n".join(acc), "finetune-share": "\n".join(share),
            "finetune-alignment": "\n".join(align), "finetune-stability": "\n".join(stab),
            "finetune-top-directions": "\n".join(tops)}


def universality_tables(study: dict[str, Any]) -> dict[str, str]:
    lines = ["| A | B | kind | matched mean | chance (usage kept) | excess | p | all pairs | label-shuffle chance | truth labels agree (chance, p) | dominant category agrees (chance, p) | same layer (chance, p) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in study["pairs"]:
        agr = r["agreement"]

        def cell(key: str) -> str:
            if key not in agr:
                return "–"
            x = agr[key]
            return f"{x['agreeing']}/{x['pairs']} ({x['chance_mean'] * x['pairs']:.1f}, {x['p_value']:.3f})"

        lines.append(f"| {r['a']} | {r['b']} | {r['kind']} | {r['matched_mean']:.3f} | {r['null_mean']:.3f} ± {r['null_std']:.3f} | "
                     f"{r['excess']:+.3f} | {r['p_value']:.3f} | {r['all_pairs_mean']:.3f} | {r['label_shuffle_null']:.3f} | "
                     f"{cell('ground_truth')} | {cell('dominant_category')} | {cell('same_layer')} |")
    groups: dict[str, list[dict]] = {}
    for r in study["pairs"]:
        key = ("within architecture, trained" if r["same_architecture"] else "across architectures, trained") \
            if r["kind"] == "trained" else ("trained vs untrained control" if r["kind"] == "control" else "untrained vs untrained")
        groups.setdefault(key, []).append(r)
    summary = ["| pairs | n | excess over chance | p-values | truth-label agreement − chance |", "|---|---|---|---|---|"]
    for key, items in groups.items():
        ex = spread([r["excess"] for r in items])
        truth = spread([r["agreement"]["ground_truth"]["observed"] - r["agreement"]["ground_truth"]["chance_mean"]
                        for r in items if "ground_truth" in r["agreement"]])
        ps = ", ".join(f"{r['p_value']:.3f}" for r in items)
        summary.append(f"| {key} | {len(items)} | {fmt(ex)} | {ps} | {fmt(truth, 2)} |")
    labels = ["| model | ground-truth labels (largest η² per head) | relative labels (η² over the model's mean) |", "|---|---|---|"]
    for name, t in study["ground_truth"].items():
        count = lambda xs: ", ".join(f"{c} {xs.count(c)}" for c in sorted(set(xs), key=lambda c: -xs.count(c)))  # noqa: E731
        labels.append(f"| {name} | {count(t['labels'])} | {count(t['relative'])} |")
    return {"universality-pairs": "\n".join(lines), "universality-summary": "\n".join(summary),
            "universality-labels": "\n".join(labels)}


def write_docs(doc: Path, tables: dict[str, str]) -> list[str]:
    """Replace each ``<!-- BEGIN GENERATED: key -->`` … ``<!-- END GENERATED: key -->`` block; return the keys done."""
    text = doc.read_text(encoding="utf-8")
    done = []
    for key, table in tables.items():
        pattern = re.compile(rf"(<!-- BEGIN GENERATED: {re.escape(key)} -->)\n.*?(<!-- END GENERATED: {re.escape(key)} -->)",
                             re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: f"{m.group(1)}\n{table}\n{m.group(2)}", text)
            done.append(key)
    doc.write_text(text, encoding="utf-8")
    return done


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    from sith.engine.models import TESTBED_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", default=",".join(STUDY), help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="fine-tuning seeds (>= 3 for the docs)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"fine-tuning steps (documented: {STEPS})")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunes run in parallel (one thread each)")
    parser.add_argument("--resume", action="store_true", help="reuse OUT/<run>-s<seed> results already there")
    parser.add_argument("--skip", choices=("finetune", "universality"), action="append", default=[])
    parser.add_argument("--base", type=Path, default=TESTBED_DIR, help="base checkpoint folder (default testbed-main)")
    parser.add_argument("--models", default=None, help="comma-separated checkpoint folders for universality "
                                                       "(default: every shipped testbed checkpoint)")
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--images", type=int, default=1000, help="held-out world images for ground-truth labels")
    parser.add_argument("--docs", type=Path, default=None, help="rewrite the generated tables in this markdown file")
    parser.add_argument("--figures", type=Path, default=None, help="also copy the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {sorted(RUNS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["command"] = "python -m sith.adaptation.experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    tables: dict[str, str] = {}
    if "finetune" not in args.skip:
        from sith.adaptation import plots
        from sith.engine.decomposition import decompose
        from sith.engine.models import load_model

        base = load_model(str(args.base))
        base_acc = accuracy(base)
        tasks = [(str(args.base), str(out), n, s, args.steps, args.resume) for n in names for s in seeds]
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                per_task = list(pool.map(run_one, *zip(*tasks)))
        else:
            per_task = [run_one(*t) for t in tasks]
        runs = {n: aggregate([r for r in per_task if r["run"] == n]) for n in names}
        results["finetune"] = {"base": {"hash": base.hash, "accuracy": base_acc}, "steps": args.steps,
                               "seeds": seeds, "configs": {n: asdict(replace(RUNS[n], steps=args.steps)) for n in names},
                               "runs": runs, "per_seed": per_task}
        tables.update(finetune_tables(base_acc, runs))
        layers = list(range(base.info.layers))
        plots.save(plots.plot_stability({n: [{"layer": row["layer"], **{k: v["mean"] for k, v in row.items() if k != "layer"}}
                                             for row in r["layers"]] for n, r in runs.items()},
                                        base=base.name, title=f"Basis stability of fine-tunes of {base.name} "
                                                              f"(mean over seeds {', '.join(map(str, seeds))})"),
                   out / "stability")
        norms = {}
        for n in names:
            rel: dict[tuple[int, int], list[float]] = {}
            for r in per_task:
                if r["run"] == n:
                    for h in r["heads"]:
                        rel.setdefault((h["layer"], h["head"]), []).append(h["relative"])
            norms[n] = [(layer, head, float(np.mean(v))) for (layer, head), v in sorted(rel.items())]
        plots.save(plots.plot_delta_norms(norms), out / "delta_norms")
        base_svd = decompose(base, layers)
        for n in names:
            first = next(r for r in per_task if r["run"] == n)
            ft = load_model(str(out / f"{n}-s{first['seed']}"))
            layer = first["top_direction"]["layer"]
            plots.save(plots.plot_spectra(base_svd, decompose(ft, [layer]), layer,
                                          labels=(base.name, f"{n} (seed {first['seed']})")), out / f"spectra_{n}_L{layer}")
    if "universality" not in args.skip:
        models = [Path(m) for m in args.models.split(",")] if args.models else default_models()
        study = universality_study(models, args.permutations, args.images, out)
        results["universality"] = study
        tables.update(universality_tables(study))
    results_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "tables.md").write_text("\n\n".join(f"<!-- {k} -->\n{v}" for k, v in tables.items()) + "\n", encoding="utf-8")
    if args.docs:
        print("rewrote tables:", write_docs(args.docs, tables))
    if args.figures:
        import shutil

        args.figures.mkdir(parents=True, exist_ok=True)
        for path in out.iterdir():
            if path.suffix in (".png", ".svg"):
                shutil.copy2(path, args.figures / path.name)
        slim = {k: v for k, v in results.items() if k != "universality"}
        if "universality" in results:
            slim["universality"] = {k: v for k, v in results["universality"].items() if k != "full"}
        (args.figures / "results.json").write_text(json.dumps(slim, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
