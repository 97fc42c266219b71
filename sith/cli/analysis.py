"""`sith decompose`, `sith explain`, `sith find`: the analysis commands.

Tables and progress bars go to the terminal through rich; progress and status lines are written to
stderr so ``--json`` output on stdout stays machine-readable. Decompositions, the data-free image
mean and codes are cached on disk (``$SITH_DATA_DIR/artifacts``), dictionary embeddings by the
engine (``$SITH_DATA_DIR/dictionaries``), so a second run of the same command is fast.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
import torch
from sith.cli.console import console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sith.engine.analysis import Analyzer, HeadSummary, SearchHit
from sith.engine.cache import DiskCache, data_dir
from sith.engine.decomposition import CONVENTION, decompose
from sith.engine.dictionary import build_dictionary
from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel
from sith.engine.jointspace import DEFAULT_IMAGE_MEAN
from sith.engine.sparse import DEFAULT_COHERENCE, DEFAULT_K, DEFAULT_METHOD, METHODS

out = console()
err = console(stderr=True)


# ------------------------------------------------------------------------------ shared options


def model_options(command: Callable) -> Callable:
    """--model/--pretrained, --checkpoint, --config, --device (default: the embedded testbed model)."""
    options = [
        click.option("--model", "model_name",
                     help="Model: testbed-main (default), testbed-small, an open_clip name (ViT-B-32[/TAG]), "
                          "hf-hub:ORG/REPO, an open_clip folder or an exported .safetensors file."),
        click.option("--pretrained", help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b79k)."),
        click.option("--checkpoint", type=click.Path(),
                     help="Weights file (.safetensors/.pt/.bin) for --model/--config, or on its own an exported "
                          "model (folder, or .safetensors that carries its config)."),
        click.option("--config", type=click.Path(), help="open_clip model-config JSON, or an hf-hub style folder."),
        click.option("--device", default=lambda: os.environ.get("SITH_DEVICE", "").strip() or "cpu",
                     show_default="SITH_DEVICE or cpu", help="torch device (cpu, cuda, cuda:1, ...)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def analysis_options(command: Callable) -> Callable:
    """Dictionary, image mean, cache, method and layer flags shared by explain and find."""
    options = [
        click.option("--dictionary", "--vocabulary", "dictionary", type=click.Path(dir_okay=False),
                     help="Text file, one concept per line, or 'default' (the built-in >=20k-word English "
                          "vocabulary) or 'testbed' (the world's words). Unset: the model decides "
                          "(testbed models -> 'testbed', others -> 'default')."),
        click.option("--image-mean", default=DEFAULT_IMAGE_MEAN, show_default=True,
                     help="Data-free: 'poles' (sign-free), 'directions' (the old default), 'null-images'; "
                          "or 'none', a tensor file (.pt/.npy/.safetensors) or an image folder (the paper's real mean)."),
        click.option("--layer", "-l", "layers", type=int, multiple=True,
                     help="Layer to analyse (repeatable; negative counts from the end). Default: the last four."),
        click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
                     help="Sparse coder: specific (top-k by specificity, the tower's 2 shared directions removed; the "
                          "measured default), COMP (the "
                          "paper's), non-negative OMP, top-k cosine or matching pursuit."),
        click.option("--min-confidence", type=float, default=0.0, show_default=True,
                     help="Hide explanations (find: hits) whose confidence is below this (0..1)."),
        click.option("-k", "k", type=int, default=DEFAULT_K, show_default=True, help="Concepts per singular vector."),
        click.option("--coherence", "--lambda", "coherence", type=float, default=DEFAULT_COHERENCE,
                     show_default=True, help="COMP coherence weight λ (ignored by other methods)."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the on-disk artifact cache."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load(model_name: str | None, pretrained: str | None, checkpoint: str | None, config: str | None,
         device: str) -> LoadedModel:
    from sith.cli.refs import load_cli_model

    with err.status("Loading model..."):
        return load_cli_model(model_name, pretrained, checkpoint, config, device)


def rich_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


def concept_list(loaded: LoadedModel, dictionary: str | None) -> list[str] | None:
    """``--dictionary`` through the one model-aware rule (``vocabulary_for``): unset = the testbed's
    own words for testbed models (their text tower never saw the English vocabulary), else the default."""
    from sith.testbed.vocabulary import vocabulary_for

    return vocabulary_for(loaded, dictionary)


def check_confidence(min_confidence: float) -> float:
    if not 0.0 <= min_confidence <= 1.0:
        raise InvalidInput("min_confidence", f"must be between 0 and 1, got {min_confidence}")
    return min_confidence


def make_analyzer(loaded: LoadedModel, dictionary: str | None, image_mean: str, device: str, no_cache: bool,
                  progress: Progress) -> Analyzer:
    """Dictionary, cache and image mean, with spinners; ``progress`` (not yet started) gets the COMP bars."""
    concepts = concept_list(loaded, dictionary)

    def bar(description: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(description, total=total)
        return functools.partial(progress.advance, task)

    # Encoding a 20k-word vocabulary takes a while on a CPU the first time (then it is cached).
    if "progress" in inspect.signature(build_dictionary).parameters:
        with progress:
            vocabulary = build_dictionary(loaded, concepts, progress=bar)  # type: ignore[call-arg]
    else:
        with err.status("Encoding the concept dictionary (cached after the first run)..."):
            vocabulary = build_dictionary(loaded, concepts)
    cache = None if no_cache else DiskCache(data_dir() / "artifacts")
    analyzer = Analyzer(loaded, vocabulary, image_mean=image_mean, device=device, cache=cache, progress=bar)
    with err.status("Resolving the image mean..."):
        analyzer.joint  # noqa: B018 - resolve (and cache) it before the bars start
    return analyzer


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2))


def model_header(loaded: LoadedModel) -> dict[str, Any]:
    return {"model": loaded.name, "hash": loaded.hash, "convention": CONVENTION}


def concept_text(concepts: list[tuple[str, float]], digits: int = 2, world: frozenset[str] | None = None) -> str:
    """Concepts with coefficients; with ``world`` (testbed models), words outside it get a "°"."""
    def name_of(name: str) -> str:
        return name if world is None or name in world else f"[italic]{name}°[/italic]"

    return ", ".join(f"{name_of(name)} [dim]{coef:.{digits}f}[/dim]" for name, coef in concepts) or "[dim](none)[/dim]"


def world_of(loaded: LoadedModel) -> frozenset[str] | None:
    """The synthetic world's words for testbed models (tables mark the other words), else None."""
    from sith.testbed.vocabulary import is_testbed, world_words

    return frozenset(world_words()) if is_testbed(loaded) else None


WORLD_NOTE = "° = not a word of the synthetic world (a learnt caption word or a user concept)"
FIDELITY_NOTE = ("fidelity = cos(code mapped back to the residual stream, v) (the paper's metric): "
                 "1 = the concepts reconstruct the vector; 0 or negative = they do not")
CONFIDENCE_NOTE = "conf = calibrated probability that the first concept is right (testbed ground truth)"


# ------------------------------------------------------------------------------ decompose


@click.command("decompose")
@model_options
@click.option("--layer", "-l", "layers", type=int, multiple=True, help="Layer (repeatable). Default: the last four.")
@click.option("--top", default=6, show_default=True, help="Singular values shown per head in the table.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Save U, S, V of every layer to this .safetensors file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (full spectra) instead of a table.")
def decompose_command(model_name, pretrained, checkpoint, config, device, layers, top, out_path, as_json) -> None:
    """Per-head SVD of the folded, centred W_VO: singular value spectra per layer and head."""
    if out_path is not None and not out_path.endswith(".safetensors"):
        raise InvalidInput("out", f"must end in .safetensors, got {out_path!r}")
    if top <= 0:
        raise InvalidInput("top", f"must be a positive integer, got {top}")
    loaded = load(model_name, pretrained, checkpoint, config, device)
    with err.status("Decomposing..."):
        svds = decompose(loaded, list(layers) or None)
    if out_path is not None:
        from safetensors.torch import save_file

        tensors = {f"layer{l}.{name}": getattr(s, name).contiguous().cpu()
                   for l, s in svds.items() for name in ("U", "S", "V")}
        save_file(tensors, out_path, metadata={k: str(v) for k, v in model_header(loaded).items()})
        err.print(f"Saved U, S, V of layers {list(svds)} to {out_path}")
    if as_json:
        emit_json({**model_header(loaded), "layers": [
            {"layer": l, "heads": [{"head": h, "sigma": s.S[h].tolist()} for h in range(s.S.shape[0])]}
            for l, s in svds.items()]})
        return
    table = Table(title=f"{loaded.name}: singular values of W_VO per head ({CONVENTION})")
    for column in ("layer", "head", *[f"σ{j + 1}" for j in range(top)], "‖W‖_F", "rank 90%"):
        table.add_column(column, justify="right")
    for layer, svd in svds.items():
        for head in range(svd.S.shape[0]):
            sigma = svd.S[head].double()
            energy = torch.cumsum(sigma**2, 0) / (sigma**2).sum().clamp_min(1e-30)
            rank90 = int((energy < 0.9).sum()) + 1
            table.add_row(str(layer), str(head), *[f"{v:.3f}" for v in sigma[:top].tolist()],
                          f"{sigma.square().sum().sqrt():.3f}", str(rank90))
    out.print(table)


# ------------------------------------------------------------------------------ explain


def _confidence_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def head_table(summaries: list[HeadSummary], title: str, world: frozenset[str] | None = None) -> Table:
    notes = [CONFIDENCE_NOTE] + ([WORLD_NOTE] if world is not None else [])
    table = Table(title=title, show_lines=True, caption="; ".join(notes))
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    table.add_column("theme")
    table.add_column("top singular vectors (σ, conf: concepts)")
    for summary in summaries:
        lines = [f"[bold]{v.sigma:.3f}[/bold] [dim]conf {_confidence_text(v.confidence)}[/dim]: "
                 f"{concept_text(v.concepts, world=world)}" for v in summary.vectors]
        table.add_row(str(summary.layer), str(summary.head), concept_text(summary.theme, 3, world),
                      "\n".join(lines) or "[dim](none above --min-confidence)[/dim]")
    return table


def vector_table(summary: HeadSummary, title: str, world: frozenset[str] | None = None) -> Table:
    with_fidelity = any(v.fidelity is not None for v in summary.vectors)
    notes = [CONFIDENCE_NOTE] + ([FIDELITY_NOTE] if with_fidelity else []) + ([WORLD_NOTE] if world is not None else [])
    table = Table(title=title, caption="; ".join(notes))
    table.add_column("j", justify="right")
    table.add_column("σ", justify="right")
    table.add_column("conf", justify="right")
    table.add_column("concepts (coefficient)")
    if with_fidelity:
        table.add_column("fidelity", justify="right")
    for v in summary.vectors:
        row = [str(v.index), f"{v.sigma:.3f}", _confidence_text(v.confidence), concept_text(v.concepts, world=world)]
        if with_fidelity:
            row.append(f"{v.fidelity:.3f}")
        table.add_row(*row)
    return table


def keep_confident(summaries: list[HeadSummary], min_confidence: float) -> list[HeadSummary]:
    """Drop the vectors whose explanation confidence is below ``min_confidence`` (heads stay)."""
    if min_confidence <= 0:
        return summaries
    for summary in summaries:
        summary.vectors = [v for v in summary.vectors if (v.confidence or 0.0) >= min_confidence]
    return summaries


@click.command("explain")
@model_options
@analysis_options
@click.option("--head", "heads", type=int, multiple=True, help="Head (repeatable). Default: all heads.")
@click.option("--vectors", default=None, type=int,
              help="Singular vectors shown per head, strongest first (default 3; 10 for a single head).")
@click.option("--theme-size", default=5, show_default=True, help="Concepts in each head's theme.")
@click.option("--fidelity", "with_fidelity", is_flag=True,
              help="Also report each vector's fidelity: cos(code mapped back to the residual stream, v); "
                   "1 = the concepts reconstruct the vector, 0 or negative = they do not.")
def explain_command(model_name, pretrained, checkpoint, config, device, dictionary, image_mean, layers, method, k,
                    coherence, min_confidence, no_cache, as_json, heads, vectors, theme_size, with_fidelity) -> None:
    """Explain attention heads: each singular vector as a few concepts (with a calibrated
    confidence), and each head's theme.

    With no arguments: every head of the last four layers of the embedded testbed model.
    """
    check_confidence(min_confidence)
    loaded = load(model_name, pretrained, checkpoint, config, device)
    single = len(heads) == 1 and len(layers) == 1
    if vectors is None:
        vectors = 10 if single else 3
    progress = rich_progress()
    analyzer = make_analyzer(loaded, dictionary, image_mean, device, no_cache, progress)
    with progress:
        summaries = analyzer.explain(list(layers) or None, list(heads) or None, method=method, k=k,
                                     coherence=coherence, vectors=vectors, theme_size=theme_size,
                                     with_fidelity=with_fidelity)
    summaries = keep_confident(summaries, min_confidence)
    world = world_of(loaded)
    if as_json:
        payload = {**model_header(loaded), "method": method, "k": k, "coherence": coherence,
                   "min_confidence": min_confidence, "dictionary_size": len(analyzer.dictionary),
                   "heads": [asdict(s) for s in summaries]}
        if world is not None:
            payload["world_words"] = sorted(w for w in analyzer.dictionary.concepts if w in world)
        emit_json(payload)
        return
    label = f"{method}, k={k}" + (f", λ={coherence:g}" if method == "comp" else "")
    if single:
        s = summaries[0]
        out.print(vector_table(s, f"{loaded.name} layer {s.layer} head {s.head} ({label})", world))
        out.print(f"[bold]theme:[/bold] {concept_text(s.theme, 3, world)}")
    else:
        out.print(head_table(summaries, f"{loaded.name}: heads explained ({label}, "
                                        f"{len(analyzer.dictionary):,} concepts)", world))


# ------------------------------------------------------------------------------ find


def hits_table(hits: list[SearchHit], title: str, world: frozenset[str] | None = None) -> Table:
    notes = ["relevance = coefficient in the code + cosine to the concept", CONFIDENCE_NOTE]
    table = Table(title=title, caption="; ".join(notes + ([WORLD_NOTE] if world is not None else [])))
    for column in ("layer", "head", "j", "σ", "relevance", "conf"):
        table.add_column(column, justify="right")
    table.add_column("matched (coef + cos)")
    table.add_column("vector's concepts", ratio=1)
    for hit in hits:
        table.add_row(str(hit.layer), str(hit.head), str(hit.index), f"{hit.sigma:.3f}", f"{hit.score:.3f}",
                      _confidence_text(hit.confidence),
                      f"{hit.matched} [dim]{hit.coefficient:.2f} + {hit.cosine:.2f}[/dim]",
                      concept_text(hit.concepts, world=world))
    return table


@click.command("find")
@model_options
@analysis_options
@click.argument("concepts", nargs=-1, required=True)
@click.option("--top", default=20, show_default=True, help="Number of singular vectors to list.")
@click.option("--free-text", is_flag=True,
              help="Accept concepts outside the dictionary (encoded on the fly; scored by cosine only).")
def find_command(model_name, pretrained, checkpoint, config, device, dictionary, image_mean, layers, method, k,
                 coherence, min_confidence, no_cache, as_json, concepts, top, free_text) -> None:
    """Rank every singular vector of the analysed layers by relevance to CONCEPTS.

    relevance = max over the concepts of (the concept's coefficient in the vector's code +
    cosine between the vector's joint-space direction and the concept's centred embedding).
    """
    check_confidence(min_confidence)
    loaded = load(model_name, pretrained, checkpoint, config, device)
    progress = rich_progress()
    analyzer = make_analyzer(loaded, dictionary, image_mean, device, no_cache, progress)
    with progress:
        hits = analyzer.find(list(concepts), list(layers) or None, top=None if min_confidence > 0 else top,
                             method=method, k=k, coherence=coherence, free_text=free_text)
    if min_confidence > 0:
        hits = [h for h in hits if (h.confidence or 0.0) >= min_confidence][:top]
    if as_json:
        emit_json({**model_header(loaded), "concepts": list(concepts), "method": method, "k": k,
                   "coherence": coherence, "min_confidence": min_confidence, "hits": [asdict(h) for h in hits]})
        return
    out.print(hits_table(hits, f"{loaded.name}: singular vectors most relevant to {', '.join(concepts)}",
                         world_of(loaded)))


def register(group: click.Group) -> None:
    group.add_command(decompose_command)
    group.add_command(explain_command)
    group.add_command(find_command)
