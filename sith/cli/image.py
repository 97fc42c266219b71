"""`sith explain-image IMAGE`: SITH's weight-space explanations tied to one concrete image.

Direct attribution through the decomposition (``sith.engine.attribution``): for the analysed
layers, which heads and which of their singular vectors write the image's embedding, by how much
(share of the embedding, all pieces of the residual stream sum to 1), and the concepts each vector
carries (its COMP explanation, as ``sith explain`` shows it).
"""

from __future__ import annotations

from dataclasses import asdict

import click

from sith.cli.analysis import (
    analysis_options,
    concept_text,
    emit_json,
    load,
    make_analyzer,
    model_header,
    model_options,
    out,
    rich_progress,
)


def _share(value: float) -> str:
    return f"{100 * value:+.1f}%"


@click.command("explain-image")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@model_options
@analysis_options
@click.option("--top", default=10, show_default=True, help="Heads and singular vectors listed.")
@click.option("--vectors-per-head", default=3, show_default=True, help="Vectors shown under each head.")
def explain_image_command(image, model_name, pretrained, checkpoint, config, device, dictionary, image_mean, layers,
                          method, k, coherence, no_cache, as_json, top, vectors_per_head, **unused) -> None:
    """Which heads and singular vectors make up one image's embedding, and what they mean.

    Each row's share is its part of the image embedding (ln_post frozen at this image; every piece
    of the residual stream together sums to 100%). Concepts describe +v: a negative coefficient
    means the image writes against them. Direct effects only (what a head changes in later layers
    is not counted).
    """
    from sith.engine.attribution import attribute_image
    from sith.engine.errors import InvalidInput

    if unused.get("min_confidence"):  # shared analysis options that do not apply to one image's rows
        raise InvalidInput("--min-confidence", "explain-image ranks vectors by their share, not by confidence")
    loaded = load(model_name, pretrained, checkpoint, config, device)
    progress = rich_progress()
    analyzer = make_analyzer(loaded, dictionary, image_mean, device, no_cache, progress)
    with progress:
        result = attribute_image(analyzer, image, list(layers) or None, top=top, vectors_per_head=vectors_per_head,
                                 method=method, k=k, coherence=coherence)
    if as_json:
        emit_json({**model_header(loaded), "method": method, "k": k, "coherence": coherence, **asdict(result)})
        return
    out.print(attribution_tables(result))


def attribution_tables(result):
    """Rich renderables for an ImageAttribution (also used by the in-process API's text view)."""
    from rich.console import Group
    from rich.table import Table

    heads = Table(title=f"{result.model}: what makes up the embedding of {result.image} "
                        f"(layers {', '.join(map(str, result.layers))})",
                  caption=f"analysed heads {_share(result.analysed_share)}, their constants "
                          f"{_share(result.constant_share)}, everything else {_share(result.rest)} "
                          f"(patch embedding, other layers, MLPs, biases)")
    for column in ("layer", "head", "share", "constant"):
        heads.add_column(column, justify="right")
    heads.add_column("its strongest vectors here (j, share: concepts)", ratio=1)
    for h in result.heads:
        lines = [f"j={v.index} [bold]{_share(v.share)}[/bold] (a={v.coefficient:+.2f}): {concept_text(v.concepts)}"
                 for v in h.vectors]
        heads.add_row(str(h.layer), str(h.head), _share(h.share), _share(h.constant), "\n".join(lines))
    vectors = Table(title="Singular vectors with the largest share")
    for column in ("layer", "head", "j", "σ", "a", "share"):
        vectors.add_column(column, justify="right")
    vectors.add_column("concepts (of +v)", ratio=1)
    for v in result.vectors:
        vectors.add_row(str(v.layer), str(v.head), str(v.index), f"{v.sigma:.3f}", f"{v.coefficient:+.3f}",
                        _share(v.share), concept_text(v.concepts))
    parts = [heads, vectors]
    if result.image_concepts:
        parts.append(f"[bold]closest concepts to the image:[/bold] {concept_text(result.image_concepts)}")
    return Group(*parts)


def register(group: click.Group) -> None:
    group.add_command(explain_image_command)
