"""`sith adapt`: fine-tuning deltas, basis stability, cross-model head matching, sub-task fine-tunes, plots.

Model arguments are model references (``sith.engine.models.load_reference``): a checkpoint folder,
a config JSON, ``hf-hub:ORG/REPO``, an open_clip name[/pretrained], or ``testbed-main`` /
``testbed-small`` / ``default``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import torch
from rich.table import Table

from sith.cli.analysis import emit_json, err, out
from sith.engine.errors import InvalidInput
from sith.engine.sparse import DEFAULT_COHERENCE, DEFAULT_K

def load_ref(ref: str, device: str = "cpu"):
    """Load a model reference (see module docstring)."""
    from sith.engine.models import load_reference

    return load_reference(ref, device)


def categories_for(name: str | None) -> dict[str, list[str]] | None:
    from sith.testbed.vocabulary import testbed_categories

    if name in (None, "none"):
        return None
    if name == "testbed":
        return testbed_categories()
    path = Path(name)
    if not path.is_file():
        raise InvalidInput("categories", f"expected 'testbed', 'none' or a JSON file {{category: [concepts]}}, got {name!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def vocabulary_words(loaded, vocabulary: str | None) -> list[str] | None:
    """The concept list for ``loaded``: the model-aware rule (testbed models -> world words), unless
    ``--vocabulary`` names 'default', 'testbed' or a file."""
    from sith.testbed.vocabulary import vocabulary_for

    return vocabulary_for(loaded, vocabulary)


_RULE = object()  # analyzer_for: apply the vocabulary rule (a list or None is taken as given)


def analyzer_for(loaded, vocabulary: str | None, no_cache: bool = False, words=_RULE, rule_model=None):
    """An Analyzer over ``words`` or, by default, the vocabulary rule applied to ``rule_model``
    (default ``loaded``: a fine-tune in a temp folder is explained with its base's words)."""
    from sith.engine.analysis import Analyzer
    from sith.engine.cache import DiskCache, data_dir
    from sith.engine.dictionary import build_dictionary

    if words is _RULE:
        words = vocabulary_words(rule_model if rule_model is not None else loaded, vocabulary)
    with err.status(f"Encoding the dictionary for {loaded.name}..."):
        dictionary = build_dictionary(loaded, words)
    cache = None if no_cache else DiskCache(data_dir() / "artifacts")
    return Analyzer(loaded, dictionary, cache=cache)


def common_options(command: Callable) -> Callable:
    options = [
        click.option("--layer", "-l", "layers", type=int, multiple=True, help="Layer (repeatable). Default: the last four."),
        click.option("--vocabulary", "--dictionary", "vocabulary", default="auto", show_default=True,
                     help="'auto' (the model decides: testbed models -> world words, others -> 20k English "
                          "words), 'default', 'testbed' or a concept file."),
        click.option("-k", "k", type=int, default=DEFAULT_K, show_default=True),
        click.option("--coherence", type=float, default=DEFAULT_COHERENCE, show_default=True),
        click.option("--device", default="cpu", show_default=True),
        click.option("--no-cache", is_flag=True, help="Do not use the on-disk artifact cache."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables."),
        click.option("--plot-dir", type=click.Path(file_okay=False), help="Also write figures (PNG + SVG) here."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _concepts(items) -> str:
    return ", ".join(f"{c} {w:.2f}" for c, w in items[:2]) or "-"


@click.group()
def adapt() -> None:
    """Fine-tuning deltas, basis stability and cross-model head matching."""


@adapt.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("--directions", type=int, default=3, show_default=True, help="Delta directions explained per head.")
@click.option("--top", type=int, default=8, show_default=True, help="Most-changed heads to show.")
@common_options
def delta(base: str, finetuned: str, directions: int, top: int, layers, vocabulary, k, coherence, device,
          no_cache, as_json, plot_dir) -> None:
    """What fine-tuning BASE into FINETUNED changed, head by head (SVD of ΔW_VO, COMP, stability)."""
    from sith.adaptation.reports import delta_report
    from sith.adaptation.stability import ROTATED_COS

    model_b, model_f = load_ref(base, device), load_ref(finetuned, device)
    analyzer = analyzer_for(model_f, vocabulary, no_cache, rule_model=model_b)  # a fine-tune keeps its base's words
    with err.status("Analysing the delta..."):
        result = delta_report(model_b, model_f, analyzer, list(layers) or None, directions, top, k=k, coherence=coherence)
    if plot_dir:
        _delta_plots(model_b, model_f, result, Path(plot_dir))
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"Most-changed heads: {model_b.name} -> {model_f.name}")
    for col in ("layer", "head", "‖ΔW‖/‖W‖", "eff. rank", "Δ direction 0 (+v | −v)", "Δ direction 1 (+v | −v)"):
        table.add_column(col)
    for h in result["top_heads"]:
        dirs = [f"σ={d['sigma']:.3f}: {_concepts(d['positive'])} | {_concepts(d['negative'])}" for d in h["directions"]]
        table.add_row(str(h["layer"]), str(h["head"]), f"{h['relative']:.3f}", f"{h['effective_rank']:.1f}",
                      *(dirs + ["", ""])[:2])
    out.print(table)
    summary = Table(title="Per layer")
    cols = ("layer", "mean_relative", "top_head", "right_subspace_cos", "right_cos_min", "right_cos_median",
            "rotated_principal", "weighted_matched_cos", "sigma_ratio_median", "diagonal_dominance", "captured")
    for col in cols:
        summary.add_column(col)
    for row in result["layers"]:
        summary.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    out.print(summary)
    out.print(f"right_cos_*: principal-angle cosines between base and fine-tuned write subspaces (all heads of "
              f"the layer pooled); rotated_principal: directions with cos < {ROTATED_COS} (see --json for each head).")


def _delta_plots(model_b, model_f, result: dict, folder: Path) -> None:
    from sith.adaptation import plots
    from sith.engine.decomposition import decompose

    layers = [row["layer"] for row in result["layers"]]
    written = plots.save(plots.plot_stability({model_f.name: result["layers"]}, base=model_b.name), folder / "stability")
    norms = [(h["layer"], h["head"], h["relative"]) for h in result["heads"]]
    written += plots.save(plots.plot_delta_norms({model_f.name: norms}), folder / "delta_norms")
    top = result["top_heads"][0]
    svd_b, svd_f = decompose(model_b, layers), decompose(model_f, layers)
    written += plots.save(plots.plot_spectra(svd_b, svd_f, top["layer"], labels=(model_b.name, model_f.name)),
                          folder / f"spectra_L{top['layer']}")
    err.print("wrote " + ", ".join(str(p) for p in written))


@adapt.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--categories", default=None, help="'testbed', 'none' or a JSON file {category: [concepts]}.")
@click.option("--all-layers", is_flag=True, help="Profile every layer (default: the last four / --layer).")
@click.option("--permutations", type=int, default=200, show_default=True,
              help="Permutations of the chance baselines (p-value resolution 1/(n+1)).")
@click.option("--control", type=click.Choice(["none", "untrained"]), default="none", show_default=True,
              help="Also match A against B with an untrained vision tower (B's trained text tower kept).")
@click.option("--ground-truth", is_flag=True,
              help="Testbed models: label heads by the world factor their class-token write carries (η² on images; "
                   "MAP towers such as testbed-siglip: their token writes weighted by the pool's attention).")
@click.option("--images", type=int, default=1000, show_default=True, help="Held-out world images for --ground-truth.")
@click.option("--profile", type=click.Choice(["relative-capacity", "capacity", "comp"]), default="relative-capacity",
              show_default=True,
              help="Head profile: data-free write capacity along each concept (relative to the tower's mean head, or "
                   "raw), or 'comp', the paper's histogram of sparse codes (-k/--coherence apply to it only).")
@common_options
def match(model_a: str, model_b: str, categories, all_layers, permutations, control, ground_truth, images, profile,
          layers, vocabulary, k, coherence, device, no_cache, as_json, plot_dir) -> None:
    """Match MODEL_A's heads to MODEL_B's by what they encode (concept profiles, Hungarian matching).

    The chance level keeps each model's concept usage (every concept permuted across B's heads) and
    comes with its permutation p-value; with --categories also the category-block chance (each
    category moved across B's heads as one block: the fairer one for capacity profiles); the old
    label shuffle is shown for comparison.
    """
    from sith.adaptation.reports import match_report
    from sith.adaptation.universality import ground_truth_eta2, untrained_vision_control

    if permutations < 1:
        raise InvalidInput("permutations", f"must be >= 1, got {permutations}")
    a, b = load_ref(model_a, device), load_ref(model_b, device)
    cats = categories_for(categories)
    words_a, words_b = vocabulary_words(a, vocabulary), vocabulary_words(b, vocabulary)
    if words_a != words_b:  # one shared concept list is required: fall back to the English default
        err.print("the two models' default vocabularies differ; using the English default for both "
                  "(pass --vocabulary to choose)")
        words_a = words_b = None
    analyzer_a = analyzer_for(a, vocabulary, no_cache, words_a)
    analyzer_b = analyzer_for(b, vocabulary, no_cache, words_b)
    la = list(range(a.info.layers)) if all_layers else (list(layers) or None)
    lb = list(range(b.info.layers)) if all_layers else (list(layers) or None)
    pairs = [(analyzer_a, analyzer_b)]
    if control == "untrained":
        pairs.append((analyzer_a, analyzer_for(untrained_vision_control(b), vocabulary, True, words_b)))
    results = []
    for one, two in pairs:
        truth = None
        if ground_truth:
            with err.status(f"Measuring ground-truth head labels on {images} world images..."):
                truth = (ground_truth_eta2(one.loaded, images), ground_truth_eta2(two.loaded, images))
        with err.status(f"Profiling and matching heads of {one.loaded.name} and {two.loaded.name}..."):
            results.append(match_report(one, two, la, lb, cats, k=k, coherence=coherence, permutations=permutations,
                                        ground_truth=truth, profile=profile))
    result, extras = results[0]
    if plot_dir:
        _match_plots(result, extras, cats, Path(plot_dir))
    if as_json:
        emit_json(result if control == "none" else {**result, "control": results[1][0]})
        return
    for res, _ in results:
        _print_match(res)


def _print_match(result: dict) -> None:
    null = result["null"]
    table = Table(title=f"Head matches {result['a']['name']} ↔ {result['b']['name']} ({result.get('profile', 'comp')} "
                        f"profiles): mean {result['mean_score']:.3f}; chance (concept usage kept) {null['mean']:.3f} ± "
                        f"{null['std']:.3f}, p = {null['p_value']:.3f}")
    for col in ("A", "B", "score", "mutual", "category A", "category B", "truth A", "truth B", "shared concepts"):
        table.add_column(col)
    for m in result["matches"]:
        table.add_row(f"L{m['a'][0]}H{m['a'][1]}", f"L{m['b'][0]}H{m['b'][1]}", f"{m['score']:.3f}",
                      "yes" if m["mutual"] else "", m["category_a"] or "-", m["category_b"] or "-",
                      m.get("truth_a") or "-", m.get("truth_b") or "-", ", ".join(m["top_concepts"] or []))
    out.print(table)
    old = result["label_shuffle_null"]
    out.print(f"mean over all {len(result['similarity']['heads_a'])}×{len(result['similarity']['heads_b'])} head pairs: "
              f"{result['all_pairs_mean']:.3f}; label-shuffle chance (too easy, for comparison): "
              f"{old['mean']:.3f} ± {old['std']:.3f}; mutual pairs {result['mutual']}/{len(result['matches'])}")
    block = result.get("category_null")
    if block:
        out.print(f"category-block chance (each category moved across B's heads as one block): {block['mean']:.3f} ± "
                  f"{block['std']:.3f}, p = {block['p_value']:.3f}")
    similar = result.get("ground_truth", {}).get("profile_similarity")
    if similar:
        out.print(f"ground-truth profile cosine of matched pairs (relative η² of every factor): "
                  f"{similar['observed']:.3f} vs random pairing {similar['chance_mean']:.3f}, p = {similar['p_value']:.3f}")
    for name, agr in result.get("agreement", {}).items():
        out.print(f"matched pairs with the same {name.replace('_', ' ')}: {agr['agreeing']}/{agr['pairs']} "
                  f"({agr['observed']:.2f}) vs chance {agr['chance_mean']:.2f}, p = {agr['p_value']:.3f}")
        if name.startswith("ground_truth"):
            out.print("  per label of A: " + "; ".join(
                f"{label} {row['agreeing']}/{row['pairs']} (chance {row['chance_mean']:.2f}, p = {row['p_value']:.3f})"
                for label, row in agr.get("per_label", {}).items()))


def _match_plots(result: dict, extras: dict, categories, folder: Path) -> None:
    from sith.adaptation import plots
    from sith.adaptation.universality import category_shares

    pa, pb = extras["profiles_a"], extras["profiles_b"]
    pairs = [(m.a, m.b) for m in extras["matches"]]
    null = result["null"]
    title = (f"{result['a']['name']} vs {result['b']['name']}: matched mean {result['mean_score']:.3f}, chance "
             f"{null['mean']:.3f} ± {null['std']:.3f} (p = {null['p_value']:.3f}), all pairs {result['all_pairs_mean']:.3f}")
    written = plots.save(plots.plot_matches(extras["similarity"], pa.heads, pb.heads, pairs,
                                            (result["a"]["name"], result["b"]["name"]), title=title), folder / "matches")
    if categories:
        for key, profiles in (("a", pa), ("b", pb)):
            names, shares = category_shares(profiles, categories)
            top = [profiles.concepts[int(i)] for i in profiles.profiles.argmax(1)]
            fig = plots.plot_themes(profiles.heads, shares.numpy(), names, top, f"Head themes: {result[key]['name']}")
            written += plots.save(fig, folder / f"themes_{result[key]['name']}")
    err.print("wrote " + ", ".join(str(p) for p in written))


@adapt.command()
@click.argument("base")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--subtask", default="round-only", show_default=True, help="World distribution to fine-tune on.")
@click.option("--mode", type=click.Choice(["full", "lora"]), default="full", show_default=True)
@click.option("--steps", type=int, default=100, show_default=True,
              help="Default: the documented recipe (docs/adaptation.md, finetune.DEFAULT_STEPS).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=None, help="Default 3e-4 (full) or 3e-3 (LoRA).")
@click.option("--rank", type=int, default=4, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=8.0, show_default=True, help="LoRA scale numerator.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--train-text", is_flag=True, help="Also train the text tower (default: vision only).")
def finetune(base, out_dir, subtask, mode, steps, batch_size, lr, rank, alpha, seed, train_text) -> None:
    """Fine-tune a testbed checkpoint folder on a sub-task of the synthetic world (full or LoRA)."""
    from sith.adaptation.finetune import FinetuneConfig, finetune_folder

    cfg = FinetuneConfig(subtask=subtask, mode=mode, steps=steps, batch_size=batch_size,
                         lr=lr if lr is not None else (3e-3 if mode == "lora" else 3e-4), rank=rank, alpha=alpha,
                         seed=seed, train_text=train_text)
    from sith.cli.refs import as_folder

    with as_folder(base, "base") as base_dir:  # testbed-main, a folder, an exported edit, ...
        summary = finetune_folder(base_dir, Path(out_dir), cfg, log=lambda line: err.print(line))
    err.print(f"saved {out_dir} ({summary['seconds']} s, {summary['trainable_parameters']} trainable parameters)")


@adapt.group()
def plot() -> None:
    """Figures (PNG + SVG): head themes, σ spectra before/after an edit, stability per layer."""


@plot.command("themes")
@click.argument("model")
@click.option("--out", "stem", required=True, type=click.Path(), help="Output path without extension.")
@click.option("--vocabulary", "--dictionary", "vocabulary", default="auto", show_default=True,
              help="'auto' (the model decides), 'default', 'testbed' or a concept file.")
@click.option("--categories", default="testbed", show_default=True)
@click.option("--all-layers", is_flag=True)
def plot_themes(model, stem, vocabulary, categories, all_layers) -> None:
    """Heatmap of head themes per layer (dominant concept category per head)."""
    from sith.adaptation import plots
    from sith.adaptation.universality import category_shares, head_profiles

    loaded = load_ref(model)
    cats = categories_for(categories)
    if not cats:
        raise InvalidInput("categories", "the themes plot needs categories")
    analyzer = analyzer_for(loaded, vocabulary)
    profiles = head_profiles(analyzer, list(range(loaded.info.layers)) if all_layers else None)
    names, shares = category_shares(profiles, cats)
    top = [profiles.concepts[int(i)] for i in profiles.profiles.argmax(1)]
    paths = plots.save(plots.plot_themes(profiles.heads, shares.numpy(), names, top, f"Head themes: {loaded.name}"), stem)
    err.print("wrote " + ", ".join(map(str, paths)))


@plot.command("spectra")
@click.argument("model")
@click.option("--edit", "edit_path", type=click.Path(dir_okay=False, exists=True),
              help="Multipliers file (sith edit output) to apply.")
@click.option("--finetuned", help="Or compare with this fine-tuned model.")
@click.option("--layer", type=int, default=-1, show_default=True)
@click.option("--out", "stem", required=True, type=click.Path())
def plot_spectra(model, edit_path, finetuned, layer, stem) -> None:
    """σ spectra of one layer's heads before and after an edit (or a fine-tune)."""
    from sith.adaptation import plots
    from sith.engine.decomposition import decompose, decompose_layer, resolve_layers
    from sith.engine.towers import adapter_for

    loaded = load_ref(model)
    layer = resolve_layers(loaded.info, [layer])[0]
    before = decompose(loaded, [layer])
    if (edit_path is None) == (finetuned is None):
        raise InvalidInput("edit", "give exactly one of --edit or --finetuned")
    if edit_path:
        from sith.edits.apply import apply_multipliers
        from sith.edits.multipliers import Multipliers

        multipliers = Multipliers.load(edit_path)
        edited = apply_multipliers(loaded.model, multipliers, decompose(loaded, multipliers.layers))
        with torch.no_grad():
            after = {layer: decompose_layer(adapter_for(edited).blocks[layer], loaded.info.heads, layer)}
        labels = (loaded.name, f"edited ({Path(edit_path).name})")
    else:
        other = load_ref(finetuned)
        after = decompose(other, [layer])
        labels = (loaded.name, other.name)
    paths = plots.save(plots.plot_spectra(before, after, layer, labels=labels), stem)
    err.print("wrote " + ", ".join(map(str, paths)))


@plot.command("stability")
@click.argument("base")
@click.argument("finetuned", nargs=-1, required=True)
@click.option("--layer", "-l", "layers", type=int, multiple=True)
@click.option("--out", "stem", required=True, type=click.Path())
def plot_stability(base, finetuned, layers, stem) -> None:
    """Stability per layer of one or more fine-tunes of BASE."""
    from sith.adaptation import plots
    from sith.adaptation.stability import layer_stability, stability

    model_b = load_ref(base)
    runs = {}
    for ref in finetuned:
        model_f = load_ref(ref)
        runs[model_f.name] = layer_stability(stability(model_b, model_f, list(layers) or list(range(model_b.info.layers))))
    paths = plots.save(plots.plot_stability(runs, base=model_b.name), stem)
    err.print("wrote " + ", ".join(map(str, paths)))


def register(group: click.Group) -> None:
    group.add_command(adapt)
