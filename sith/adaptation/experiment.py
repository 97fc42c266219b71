"""The testbed adaptation study behind docs/adaptation.md (``python -m sith.adaptation.experiment OUT``).

1. Fine-tune the base (default testbed-main) on sub-tasks (``--runs``; the documented study,
   ``STUDY``: red and blue swapped in the captions, full and LoRA; one shape family, full and LoRA,
   with the other family as control; a colour renamed to a never-seen word).
2. For each: zero-shot colour/shape accuracy and the word probes before and after, the delta
   report and stability per layer, and the *task share* of the delta explanations on the most
   changed heads, against the base's own singular vectors of the same heads (explained the same
   way, both poles).
3. Universality: base vs ``--other`` (default testbed-small), all layers, testbed categories.
4. Figures (PNG + SVG) and ``results.json`` in OUT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sith.adaptation import plots
from sith.adaptation.delta import base_norms, concept_alignment, concept_share, delta_decomposition, explain_delta
from sith.adaptation.finetune import COOL, NEW_WORDS, SUBTASKS, WARM, FinetuneConfig, finetune_folder
from sith.adaptation.reports import delta_report, match_report
from sith.adaptation.universality import category_shares
from sith.testbed.vocabulary import testbed_categories, testbed_vocabulary
from sith.engine.analysis import Analyzer
from sith.engine.decomposition import decompose
from sith.engine.dictionary import build_dictionary
from sith.engine.models import TESTBED_DIR, load_model
from sith.testbed.evaluate import class_embeddings, encode_images, factor_set, zero_shot_factors
from sith.testbed.factors import ANGULAR_SHAPES, COLOURS, ROUND_SHAPES

def _full(subtask: str) -> FinetuneConfig:
    return FinetuneConfig(subtask=subtask, mode="full", steps=240, lr=3e-4)


def _lora(subtask: str) -> FinetuneConfig:
    return FinetuneConfig(subtask=subtask, mode="lora", steps=240, lr=3e-3, rank=4, alpha=8.0)


RUNS = {
    "full-crimson": _full("crimson"), "lora-crimson": _lora("crimson"), "full-azure": _full("azure"),
    "full-warm": _full("warm-colours"), "lora-warm": _lora("warm-colours"), "full-cool": _full("cool-colours"),
    "full-round": _full("round-only"), "lora-round": _lora("round-only"), "full-angular": _full("angular-only"),
    "full-swap": _full("swap-red-blue"), "lora-swap": _lora("swap-red-blue"),
}
STUDY = ("full-swap", "lora-swap", "full-round", "lora-round", "full-angular", "full-crimson")
CONCEPT_SETS = {
    **{name: frozenset(SUBTASKS[f"{name}-" + ("colours" if name in ("warm", "cool") else "only")].concepts)
       for name in ("warm", "cool", "round", "angular")},
    "crimson": frozenset({"crimson"}), "azure": frozenset({"azure"}), "red": frozenset({"red"}),
    "blue": frozenset({"blue"}), "swap": frozenset(SUBTASKS["swap-red-blue"].concepts),
}


def accuracy(loaded) -> dict[str, float]:
    """Zero-shot accuracy per class group (mean of per-class accuracies on 1,000 held-out images), and
    the new-word probe: share of red (blue) images whose best prompt among the ten colours plus
    "crimson" and "azure" is "a crimson object" ("an azure object")."""
    result = zero_shot_factors(loaded.model, loaded.tokenizer, n=1000)
    shape, colour = result["shape"]["per_class"], result["colour"]["per_class"]
    mean = lambda table, names: round(sum(table[s] for s in names) / len(names), 4)  # noqa: E731
    batch = factor_set(1000)
    features = encode_images(loaded.model, batch.images)
    words = list(COLOURS) + list(NEW_WORDS)
    prompts = [f"{'an' if w[0] in 'aeiou' else 'a'} {w} object" for w in words]
    pred = (features @ class_embeddings(loaded.model, loaded.tokenizer, prompts).T).argmax(-1)
    labels = batch.labels["colour"]

    def probe(colour: str, word: str) -> float:
        chosen = pred[labels == list(COLOURS).index(colour)]
        return round(float((chosen == words.index(word)).float().mean()), 4)

    return {"round": mean(shape, ROUND_SHAPES), "angular": mean(shape, ANGULAR_SHAPES),
            "shape": result["shape"]["accuracy"], "warm": mean(colour, WARM), "cool": mean(colour, COOL),
            "colour": result["colour"]["accuracy"], "red->crimson": probe("red", "crimson"),
            "blue->azure": probe("blue", "azure"), "red->blue": probe("red", "blue"), "blue->red": probe("blue", "red")}


ALIGNMENT_WORDS = ("crimson", "azure", "red", "blue", "orange", "green", "circle", "star")
TOP_HEADS = 6  # task shares are measured on the heads fine-tuning changed most


def shares(heads) -> dict[str, float]:
    sets = {**CONCEPT_SETS, **{f"category:{c}": frozenset(w) for c, w in testbed_categories().items()}}
    return {name: round(concept_share(heads, words), 4) for name, words in sets.items()}


def most_changed(delta_heads, n: int = TOP_HEADS) -> list[tuple[int, int]]:
    return [(h.layer, h.head) for h in sorted(delta_heads, key=lambda h: (-h.relative, h.layer, h.head))[:n]]


def pick(heads, keys: list[tuple[int, int]]):
    return [h for h in heads if (h.layer, h.head) in set(keys)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=None, help="override the fine-tuning steps")
    parser.add_argument("--skip-finetune", action="store_true", help="reuse OUT/<run> checkpoints")
    parser.add_argument("--runs", default=",".join(STUDY), help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--no-universality", action="store_true")
    parser.add_argument("--base", type=Path, default=TESTBED_DIR, help="base checkpoint folder (default testbed-main)")
    parser.add_argument("--other", type=Path, default=TESTBED_DIR.parent / "testbed-small",
                        help="second model for universality (default testbed-small)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    vocab = testbed_vocabulary() + list(NEW_WORDS)  # the renamed words must be nameable
    base_dir = args.base
    base = load_model(str(base_dir))
    layers = list(range(base.info.layers))
    base_analyzer = Analyzer(base, build_dictionary(base, vocab))
    base_svd = decompose(base, layers)
    base_expl = explain_delta(base_svd, base_norms(base, layers), base_analyzer, directions=3)
    results = {"base": {"hash": base.hash, "accuracy": accuracy(base), "own_vectors_share": shares(base_expl)},
               "runs": {}}
    stability_rows, norms = {}, {}
    for name in args.runs.split(","):
        cfg = RUNS[name]
        if args.steps:
            cfg.steps = args.steps
        folder = out / name
        started = time.time()
        if not args.skip_finetune:
            finetune_folder(base_dir, folder, cfg, log=lambda line: print(name, line, flush=True))
        ft = load_model(str(folder))
        analyzer = Analyzer(ft, build_dictionary(ft, vocab))
        report = delta_report(base, ft, analyzer, layers, directions=3, top=6)
        delta = delta_decomposition(base, ft, layers)
        heads = explain_delta(delta, base_norms(base, layers), analyzer, directions=3)
        keys = most_changed(heads)
        scores = concept_alignment(delta, keys, analyzer, directions=3)
        order = scores.argsort(descending=True).tolist()
        alignment = {"top": [vocab[i] for i in order[:8]],
                     "rank": {w: order.index(vocab.index(w)) + 1 for w in ALIGNMENT_WORDS}, "of": len(vocab)}
        summary = json.loads((folder / "finetune.json").read_text())
        results["runs"][name] = {
            "config": summary["config"], "train_seconds": summary["seconds"],
            "trainable_parameters": summary["trainable_parameters"], "final_loss": summary["history"][-1]["loss"],
            "accuracy": accuracy(ft), "top_changed_heads": keys, "alignment": alignment,
            "delta_share_all_heads": shares(heads), "delta_share": shares(pick(heads, keys)),
            "base_share_same_heads": shares(pick(base_expl, keys)),
            "layers": report["layers"], "top_heads": report["top_heads"],
            "analysis_seconds": round(time.time() - started, 1),
        }
        stability_rows[name] = report["layers"]
        norms[name] = [(h["layer"], h["head"], h["relative"]) for h in report["heads"]]
        ft_svd = decompose(ft, layers)
        top = report["top_heads"][0]
        plots.save(plots.plot_spectra(base_svd, ft_svd, top["layer"], labels=("base", name)),
                   out / f"spectra_{name}_L{top['layer']}")
        print(json.dumps({name: {k: results["runs"][name][k] for k in ("accuracy", "delta_share", "alignment")}}), flush=True)
    plots.save(plots.plot_stability(stability_rows), out / "stability")
    plots.save(plots.plot_delta_norms(norms), out / "delta_norms")

    if args.no_universality:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return
    small = load_model(str(args.other))
    small_analyzer = Analyzer(small, build_dictionary(small, vocab))
    categories = testbed_categories()
    match, extras = match_report(base_analyzer, small_analyzer, layers, list(range(small.info.layers)), categories)
    results["universality"] = match
    pairs = [(m.a, m.b) for m in extras["matches"]]
    plots.save(plots.plot_matches(extras["similarity"], extras["profiles_a"].heads, extras["profiles_b"].heads,
                                  pairs, ("testbed-main", "testbed-small")), out / "matches")
    for label, profiles in (("testbed-main", extras["profiles_a"]), ("testbed-small", extras["profiles_b"])):
        names, cat_shares = category_shares(profiles, categories)
        top = [profiles.concepts[int(i)] for i in profiles.profiles.argmax(1)]
        plots.save(plots.plot_themes(profiles.heads, cat_shares.numpy(), names, top, f"Head themes: {label}"),
                   out / f"themes_{label}")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"universality": {k: match[k] for k in ("mean_score", "null_mean_score", "null_std", "mutual")}}))


if __name__ == "__main__":
    main()
