"""`sith edit preview|apply|revert|show`: concept edits by name on a stock open_clip checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sith.cli.analysis import load, make_analyzer, model_options, rich_progress
from sith.engine.errors import InvalidInput

ACTIONS = ("suppress", "amplify", "flip", "scale")


def _spec_options(func):
    options = [
        click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False),
                     help="Edit spec JSON (instead of the inline options below)."),
        click.option("--concept", "concepts", multiple=True, help="Concept by name (repeatable)."),
        click.option("--action", type=click.Choice(ACTIONS), default="suppress", show_default=True),
        click.option("--strength", type=float, default=None, help="α (default: suppress 0, amplify 1.5, flip -1)."),
        click.option("--top", type=int, default=None, help="Select the N most relevant vectors (default 8)."),
        click.option("--threshold", type=float, default=None, help="Select every vector with relevance >= T."),
        click.option("--vector", "vectors", multiple=True, help="Explicit LAYER,HEAD,INDEX (repeatable)."),
        click.option("--layers", default=None, help="Comma-separated layers (negative ok; default last four)."),
        click.option("--dictionary", default=None, type=click.Path(dir_okay=False),
                     help="Concept list, one per line, or 'default' / 'testbed' (as for `sith explain`)."),
        click.option("--image-mean", default="directions", show_default=True,
                     help="'directions' (data-free), 'none', a tensor file or an image folder."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the on-disk artifact cache."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load(model_name, pretrained, checkpoint, config, spec_model: str | None, device: str):
    """The model options win; otherwise the spec's model reference (a name or folder)."""
    if model_name is None and config is None and spec_model not in (None, "", "default", "testbed-main"):
        model_name = spec_model
    return load(model_name, pretrained, checkpoint, config, device)


def _inline_spec(model: str, concepts, action, strength, top, threshold, vectors, layers):
    from sith.edits.spec import EditSpec

    if not concepts:
        raise InvalidInput("--concept", "name at least one concept (or pass --spec FILE)")
    rules = [r for r, on in (("top_n", top is not None), ("threshold", threshold is not None),
                             ("explicit", bool(vectors))) if on]
    if len(rules) > 1:
        raise InvalidInput("--top/--threshold/--vector", "choose one selection rule")
    select: dict = {"rule": rules[0] if rules else "top_n"}
    if top is not None:
        select["n"] = top
    if threshold is not None:
        select["threshold"] = threshold
    if vectors:
        try:
            select["vectors"] = [[int(x) for x in v.split(",")] for v in vectors]
        except ValueError:
            raise InvalidInput("--vector", f"expected LAYER,HEAD,INDEX, got {vectors!r}") from None
    op = {"concepts": list(concepts), "action": action, "strength": strength, "select": select}
    if layers:
        try:
            op["layers"] = [int(x) for x in layers.split(",")]
        except ValueError:
            raise InvalidInput("--layers", f"expected comma-separated integers, got {layers!r}") from None
    return EditSpec.from_dict({"model": model, "operations": [op]})


def _plan(opts: dict):
    """Load the model, build the spec and the analyzer, and plan the edit."""
    from sith.edits.plan import plan_edit
    from sith.edits.spec import EditSpec

    spec = EditSpec.from_json(Path(opts["spec_path"]).read_text(encoding="utf-8")) if opts["spec_path"] else None
    loaded = _load(opts["model_name"], opts["pretrained"], opts["checkpoint"], opts["config"],
                   spec.model if spec else None, opts["device"])
    if spec is None:
        spec = _inline_spec(loaded.name, opts["concepts"], opts["action"], opts["strength"], opts["top"],
                            opts["threshold"], opts["vectors"], opts["layers"])
    progress = rich_progress()
    analyzer = make_analyzer(loaded, opts["dictionary"], opts["image_mean"], opts["device"], opts["no_cache"], progress)
    with progress:
        return loaded, plan_edit(analyzer, spec)


def _print_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    vectors = Table(title=f"Vectors that would change ({len(plan.affected)}) — judge {plan.judge}")
    for col in ("op", "layer", "head", "idx", "σ", "α", "relevance", "explanation (COMP)"):
        vectors.add_column(col)
    for a in plan.affected:
        words = ", ".join(f"{c} {w:.2f}" for c, w in a.concepts)
        vectors.add_row(str(a.operation), str(a.layer), str(a.head), str(a.index), f"{a.sigma:.3f}",
                        f"{a.alpha:g}", f"{a.relevance:.3f}", words)
    console.print(vectors)
    heads = Table(title="Spectral energy Σσ² per affected head")
    for col in ("layer", "head", "vectors", "before", "after", "kept"):
        heads.add_column(col)
    for h in plan.heads:
        heads.add_row(str(h.layer), str(h.head), str(h.vectors), f"{h.energy_before:.4f}", f"{h.energy_after:.4f}",
                      f"{100 * h.energy_ratio:.1f}%")
    console.print(heads)
    align = Table(title="Concept alignment ‖diag(σ)Vᵀy_c‖ per affected head (data-free)")
    for col in ("concept", "layer", "head", "before", "after", "kept"):
        align.add_column(col)
    for row in plan.concept_alignment:
        align.add_row(row.concept, str(row.layer), str(row.head), f"{row.before:.4f}", f"{row.after:.4f}",
                      f"{100 * row.ratio:.1f}%")
    console.print(align)
    for note in plan.notes:
        console.print(f"note: {note}")


def _edit_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".edit.safetensors")


@click.group("edit")
def edit() -> None:
    """Suppress, amplify, flip or scale concepts by name in a CLIP vision tower (data-free)."""


@edit.command("preview")
@model_options
@_spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def preview(as_json: bool, **opts) -> None:
    """Dry run: which vectors would change, their explanations, and what each head would lose."""
    _, plan = _plan(opts)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        _print_plan(plan)


@edit.command("apply")
@model_options
@_spec_options
@click.option("--multipliers", "multipliers_path", type=click.Path(exists=True, dir_okay=False),
              help="Re-apply a stored edit (*.edit.safetensors) instead of planning one.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors checkpoint.")
def apply(multipliers_path: str | None, out: str, **opts) -> None:
    """Apply an edit and export a stock open_clip checkpoint (+ OUT.edit.safetensors multipliers)."""
    from sith.edits.apply import apply_multipliers
    from sith.edits.export import export_checkpoint
    from sith.edits.multipliers import Multipliers
    from sith.engine.decomposition import decompose

    out_path = Path(out)
    if multipliers_path:
        multipliers = Multipliers.load(multipliers_path)
        loaded = _load(opts["model_name"], opts["pretrained"], opts["checkpoint"], opts["config"], None, opts["device"])
        if multipliers.model_hash and multipliers.model_hash != loaded.hash:
            raise InvalidInput("--multipliers", f"edit was made for model {multipliers.model_hash[:12]}, "
                               f"this model is {loaded.hash[:12]}")
        decomposition = decompose(loaded, multipliers.layers)
        manifest = {"base_model": loaded.name, "base_hash": loaded.hash, "spec": None,
                    "multipliers": multipliers.to_manifest(), "source": Path(multipliers_path).name}
    else:
        loaded, plan = _plan(opts)
        multipliers, decomposition, manifest = plan.multipliers, plan.decomposition, plan.manifest()
        _print_plan(plan)
    edited = apply_multipliers(loaded.model, multipliers, decomposition)
    export_checkpoint(edited, out_path, manifest)
    multipliers.save(_edit_path(out_path))
    click.echo(f"wrote {out_path} and {_edit_path(out_path)} ({len(multipliers.changed())} vectors changed)")


@edit.command("revert")
@click.argument("edited", type=click.Path(exists=True))
@model_options
@click.option("--remove", "remove_path", type=click.Path(exists=True, dir_okay=False),
              help="Remove only this edit (*.edit.safetensors) from a composed one; default: remove all.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def revert(edited: str, remove_path: str | None, out: str, model_name, pretrained, checkpoint, config,
           device: str) -> None:
    """Undo an exported edit: rebuild from the base model (given with the model options)."""
    from sith.edits.apply import apply_multipliers
    from sith.edits.export import export_checkpoint, read_manifest
    from sith.edits.multipliers import Multipliers
    from sith.engine.decomposition import decompose

    manifest = read_manifest(edited)
    base = _load(model_name, pretrained, checkpoint, config, manifest.get("base_model"), device)
    if base.hash != manifest.get("base_hash"):
        raise InvalidInput("--model", f"this is not the edit's base model (hash {base.hash[:12]}, the edit "
                           f"was made on {str(manifest.get('base_hash'))[:12]})")
    current = Multipliers.from_manifest(manifest["multipliers"])
    if remove_path:
        remaining = current.compose(Multipliers.load(remove_path).inverse())
    else:
        remaining = Multipliers.ones(current.layers, *next(iter(current.values.values())).shape, base.hash)
    result = apply_multipliers(base.model, remaining, decompose(base, remaining.layers))
    export_checkpoint(result, Path(out), {"base_model": base.name, "base_hash": base.hash, "spec": None,
                                          "multipliers": remaining.to_manifest(), "reverted_from": Path(edited).name})
    click.echo(f"wrote {out} ({len(remaining.changed())} vectors still edited)")


@edit.command("show")
@click.argument("edited", type=click.Path(exists=True))
def show(edited: str) -> None:
    """Print the SITH manifest of an exported checkpoint."""
    from sith.edits.export import read_manifest

    click.echo(json.dumps(read_manifest(edited), indent=2))


def register(group: click.Group) -> None:
    group.add_command(edit)
