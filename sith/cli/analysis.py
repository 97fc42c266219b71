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
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sith.engine.analysis import Analyzer, HeadSummary, SearchHit
from sith.engine.cache import DiskCache, data_dir
from sith.engine.decomposition import CONVENTION, decompose
from sith.engine.dictionary import build_dictionary
from sith.engine.errors import InvalidInput
from sith.engine.models import LoadedModel, load_model
from sith.engine.sparse import DEFAULT_COHERENCE, DEFAULT_K, METHODS

out = Console()
err = Console(stderr=True)


# ------------------------------------------------------------------------------ shared options


def model_options(command: Callable) -> Callable:
    """--model/--pretrained, --checkpoint, --config, --device (default: the embedded testbed model)."""
    options = [
        click.option("--model", "model_name", help="open_clip model name (e.g. ViT-B-32) or an hf-hub style folder."),
        click.option("--pretrained", help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b79k)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False), help="Weights file (.safetensors/.pt/.bin)."),
        click.option("--config", type=click.Path(), help="open_clip model-config JSON, or an hf-hub style folder."),
        click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1, ...)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def analysis_options(command: Callable) -> Callable:
    """Dictionary, image mean, cache, method and layer flags shared by explain and find."""
    options = [
        click.option("--dictionary", type=click.Path(dir_okay=False),
                     help="Text file, one concept per line, or 'default' (the built-in >=20k-word "
                          "vocabulary) or 'testbed' (default for the shipped testbed models)."),
        click.option("--image-mean", default="directions", show_default=True,
                     help="'directions' (data-free), 'none', a tensor file (.pt/.npy/.safetensors) or an image folder."),
        click.option("--layer", "-l", "layers", type=int, multiple=True,
                     help="Layer to analyse (repeatable; negative counts from the end). Default: the last four."),
        click.option("--method", type=click.Choice(METHODS), default="comp", show_default=True,
                     help="Sparse coder: COMP, non-negative OMP, top-k cosine or matching pursuit."),
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
    with err.status("Loading model..."):
        return load_model(model_name, pretrained, checkpoint=checkpoint, config=config, device=device)


def rich_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


def concept_list(loaded: LoadedModel, dictionary: str | None) -> list[str] | None:
    """``--dictionary`` as ``concepts_for``; unset = the testbed's own words for the shipped testbed
    models (their text tower never saw the English vocabulary), else the default."""
    from sith.testbed.vocabulary import concepts_for

    if dictionary is None:
        dictionary = "testbed" if loaded.name.startswith("testbed-") else "default"
    return concepts_for(dictionary)


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


def concept_text(concepts: list[tuple[str, float]], digits: int = 2) -> str:
    return ", ".join(f"{name} [dim]{coef:.{digits}f}[/dim]" for name, coef in concepts) or "[dim](none)[/dim]"


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


def head_table(summaries: list[HeadSummary], title: str) -> Table:
    table = Table(title=title, show_lines=True)
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    table.add_column("theme")
    table.add_column("top singular vectors (σ: concepts)")
    for summary in summaries:
        lines = [f"[bold]{v.sigma:.3f}[/bold]: {concept_text(v.concepts)}" for v in summary.vectors]
        table.add_row(str(summary.layer), str(summary.head), concept_text(summary.theme, 3), "\n".join(lines))
    return table


def vector_table(summary: HeadSummary, title: str) -> Table:
    table = Table(title=title)
    table.add_column("j", justify="right")
    table.add_column("σ", justify="right")
    table.add_column("concepts (coefficient)")
    with_fidelity = any(v.fidelity is not None for v in summary.vectors)
    if with_fidelity:
        table.add_column("fidelity", justify="right")
    for v in summary.vectors:
        row = [str(v.index), f"{v.sigma:.3f}", concept_text(v.concepts)]
        if with_fidelity:
            row.append(f"{v.fidelity:.3f}")
        table.add_row(*row)
    return table


@click.command("explain")
@model_options
@analysis_options
@click.option("--head", "heads", type=int, multiple=True, help="Head (repeatable). Default: all heads.")
@click.option("--vectors", default=None, type=int,
              help="Singular vectors shown per head, strongest first (default 3; 10 for a single head).")
@click.option("--theme-size", default=5, show_default=True, help="Concepts in each head's theme.")
@click.option("--fidelity", "with_fidelity", is_flag=True, help="Also report each vector's reconstruction fidelity.")
def explain_command(model_name, pretrained, checkpoint, config, device, dictionary, image_mean, layers, method, k,
                    coherence, no_cache, as_json, heads, vectors, theme_size, with_fidelity) -> None:
    """Explain attention heads: each singular vector as a few concepts, and each head's theme.

    With no arguments: every head of the last four layers of the embedded testbed model.
    """
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
    if as_json:
        emit_json({**model_header(loaded), "method": method, "k": k, "coherence": coherence,
                   "dictionary_size": len(analyzer.dictionary), "heads": [asdict(s) for s in summaries]})
        return
    label = f"{method}, k={k}" + (f", λ={coherence:g}" if method == "comp" else "")
    if single:
        s = summaries[0]
        out.print(vector_table(s, f"{loaded.name} layer {s.layer} head {s.head} ({label})"))
        out.print(f"[bold]theme:[/bold] {concept_text(s.theme, 3)}")
    else:
        out.print(head_table(summaries, f"{loaded.name}: heads explained ({label}, "
                                        f"{len(analyzer.dictionary):,} concepts)"))


# ------------------------------------------------------------------------------ find


def hits_table(hits: list[SearchHit], title: str) -> Table:
    table = Table(title=title, caption="relevance = coefficient in the code + cosine to the concept")
    for column in ("layer", "head", "j", "σ", "relevance"):
        table.add_column(column, justify="right")
    table.add_column("matched (coef + cos)")
    table.add_column("vector's concepts", ratio=1)
    for hit in hits:
        table.add_row(str(hit.layer), str(hit.head), str(hit.index), f"{hit.sigma:.3f}", f"{hit.score:.3f}",
                      f"{hit.matched} [dim]{hit.coefficient:.2f} + {hit.cosine:.2f}[/dim]",
                      concept_text(hit.concepts))
    return table


@click.command("find")
@model_options
@analysis_options
@click.argument("concepts", nargs=-1, required=True)
@click.option("--top", default=20, show_default=True, help="Number of singular vectors to list.")
@click.option("--free-text", is_flag=True,
              help="Accept concepts outside the dictionary (encoded on the fly; scored by cosine only).")
def find_command(model_name, pretrained, checkpoint, config, device, dictionary, image_mean, layers, method, k,
                 coherence, no_cache, as_json, concepts, top, free_text) -> None:
    """Rank every singular vector of the analysed layers by relevance to CONCEPTS.

    relevance = max over the concepts of (the concept's coefficient in the vector's code +
    cosine between the vector's joint-space direction and the concept's centred embedding).
    """
    loaded = load(model_name, pretrained, checkpoint, config, device)
    progress = rich_progress()
    analyzer = make_analyzer(loaded, dictionary, image_mean, device, no_cache, progress)
    with progress:
        hits = analyzer.find(list(concepts), list(layers) or None, top=top, method=method, k=k,
                             coherence=coherence, free_text=free_text)
    if as_json:
        emit_json({**model_header(loaded), "concepts": list(concepts), "method": method, "k": k,
                   "coherence": coherence, "hits": [asdict(h) for h in hits]})
        return
    out.print(hits_table(hits, f"{loaded.name}: singular vectors most relevant to {', '.join(concepts)}"))


def register(group: click.Group) -> None:
    group.add_command(decompose_command)
    group.add_command(explain_command)
    group.add_command(find_command)
