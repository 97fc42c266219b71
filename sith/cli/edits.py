"""`sith edit preview|apply|revert|show`: concept edits by name on a stock open_clip checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sith.cli.analysis import load, make_analyzer, model_options, out, rich_progress
from sith.engine.errors import InvalidInput
from sith.engine.jointspace import DEFAULT_IMAGE_MEAN

ACTIONS = ("suppress", "amplify", "flip", "scale", "debias")
# Must list sith.edits.operators.OPERATORS (not imported here: the CLI starts without torch);
# tests/test_edits_operators.py checks they agree.
OPERATOR_CHOICES = ("auto", "head_mlp_orthogonal", "head_mlp_project", "head_project", "sith_scale", "head_ablation",
                    "output_projection")


def _spec_options(func):
    options = [
        click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False),
                     help="Edit spec JSON (instead of the inline options below)."),
        click.option("--concept", "concepts", multiple=True, help="Concept by name (repeatable)."),
        click.option("--action", type=click.Choice(ACTIONS), default="suppress", show_default=True),
        click.option("--operator", type=click.Choice(OPERATOR_CHOICES), default="auto", show_default=True,
                     help="How the model is changed (docs/edits.md); auto = head_mlp_orthogonal."),
        click.option("--target", type=float, default=None,
                     help="Goal: suppress to this predicted presence (default 0.15, corrected for the concept's prior; "
                          "debias: default 0.25), "
                          "amplify by this factor."),
        click.option("--preserve", "preserve", multiple=True, help="Concept that must not move (repeatable)."),
        click.option("--no-preserve-neighbours", is_flag=True,
                     help="Do not protect the concept's dictionary neighbours (e.g. the other colours)."),
        click.option("--anchor", default="auto", show_default=True,
                     help="Concept that takes over part of what a suppress removes (red -> orange keeps the "
                          "colours mixed with red); auto = the nearest preserved neighbour, none = off."),
        click.option("--strength", type=float, default=None,
                     help="α (expert; default: solved for the target, or suppress 0 / amplify 1.5 / flip -1 "
                          "with --top)."),
        click.option("--top", type=int, default=None, help="Expert override: the N best writers instead of the "
                     "planner's choice."),
        click.option("--threshold", type=float, default=None, help="Select every vector with relevance >= T."),
        click.option("--vector", "vectors", multiple=True, help="Explicit LAYER,HEAD,INDEX (repeatable)."),
        click.option("--layers", default=None, help="Comma-separated layers (negative ok; default last four)."),
        click.option("--dictionary", "--vocabulary", "dictionary", default=None, type=click.Path(dir_okay=False),
                     help="Concept list, one per line, or 'default' / 'testbed' (as for `sith explain`)."),
        click.option("--image-mean", default=DEFAULT_IMAGE_MEAN, show_default=True,
                     help="Data-free mean (as for `sith explain`), 'none', a tensor file or an image folder."),
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


def _inline_spec(model: str, concepts, action, strength, top, threshold, vectors, layers, operator="auto",
                 target=None, preserve=(), no_preserve_neighbours=False, anchor="auto"):
    from sith.edits.spec import EditSpec

    if not concepts:
        raise InvalidInput("--concept", "name at least one concept (or pass --spec FILE)")
    rules = [r for r, on in (("top_n", top is not None), ("threshold", threshold is not None),
                             ("explicit", bool(vectors))) if on]
    if len(rules) > 1:
        raise InvalidInput("--top/--threshold/--vector", "choose one selection rule")
    select: dict = {"rule": rules[0] if rules else "auto"}
    if top is not None:
        select["n"] = top
    if threshold is not None:
        select["threshold"] = threshold
    if vectors:
        try:
            select["vectors"] = [[int(x) for x in v.split(",")] for v in vectors]
        except ValueError:
            raise InvalidInput("--vector", f"expected LAYER,HEAD,INDEX, got {vectors!r}") from None
    op = {"concepts": list(concepts), "action": action, "strength": strength, "select": select,
          "operator": operator, "target": target, "preserve": list(preserve),
          "preserve_neighbours": not no_preserve_neighbours, "anchor": anchor}
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
                            opts["threshold"], opts["vectors"], opts["layers"], opts["operator"], opts["target"],
                            opts["preserve"], opts["no_preserve_neighbours"], opts["anchor"])
    progress = rich_progress()
    analyzer = make_analyzer(loaded, opts["dictionary"], opts["image_mean"], opts["device"], opts["no_cache"], progress)
    with progress:
        return loaded, plan_edit(analyzer, spec)


def _writer(a) -> tuple[str, str, str]:
    if a.layer < 0:
        return "proj", "–", "–"
    return str(a.layer), "mlp" if a.head < 0 else str(a.head), "–" if a.index < 0 else str(a.index)


def _print_plan(plan) -> None:
    from rich.table import Table

    console = out  # wide when piped (sith.cli.console)
    ops = "; ".join(f"[{i}] {op.action} {', '.join(op.concepts)} with {op.operator}"
                    + (f" to {op.target:g}" if op.target is not None else "")
                    for i, op in enumerate(plan.spec.operations))
    console.print(f"Edit: {ops}")
    predicted = Table(title="Predicted presence (data-free; 1 = untouched, 0 = removed)")
    for col in ("concept", "role", "before", "after"):
        predicted.add_column(col)
    for e in plan.predicted:
        predicted.add_row(e.concept, e.role, f"{e.before:.2f}", f"{e.after:.3f}")
    console.print(predicted)
    vectors = Table(title=f"Writers that would change ({len(plan.affected)}) — judge {plan.judge}")
    for col in ("op", "operator", "layer", "head", "idx", "σ / share", "α", "relevance", "explanation"):
        vectors.add_column(col)
    for a in plan.affected:
        words = ", ".join(f"{c} {w:.2f}" for c, w in a.concepts)
        vectors.add_row(str(a.operation), a.operator, *_writer(a), f"{a.sigma:.3f}", f"{a.alpha:.3g}",
                        f"{a.relevance:.3f}", words)
    console.print(vectors)
    heads = Table(title="Write energy per affected head (Σσ² before, ‖diag(ασ)VᵀT‖² after)")
    for col in ("layer", "head", "writers", "before", "after", "kept"):
        heads.add_column(col)
    for h in plan.heads:
        heads.add_row(str(h.layer), str(h.head), str(h.vectors), f"{h.energy_before:.4f}", f"{h.energy_after:.4f}",
                      f"{100 * h.energy_ratio:.1f}%")
    console.print(heads)
    from rich.markup import escape

    for note in plan.notes:
        console.print(f"note: {escape(note)}")
    for warning in plan.warnings:  # escaped: the tags ([prior], [unreachable], …) are text, not markup
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")


def _changes(multipliers) -> str:
    """"3 singular values, 24 write maps": what an edit changes, in both of its forms."""
    parts = [f"{len(multipliers.changed())} singular value(s)"]
    if multipliers.maps:
        parts.append(f"{len(multipliers.maps)} write map(s)")
    return ", ".join(parts)


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
@click.option("--out", required=True, type=click.Path(),
              help="Output: a folder (open_clip layout, loads with open_clip 'local-dir:') or one X.safetensors "
                   "file that carries its config. Both reopen with any `sith --model`.")
def apply(multipliers_path: str | None, out: str, **opts) -> None:
    """Apply an edit and export the edited model (+ its multipliers, to re-apply, compose or revert)."""
    from sith.edits.apply import apply_multipliers
    from sith.edits.export import export_model
    from sith.edits.export import multipliers_path as edit_file
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
    export_model(edited, out_path, manifest, loaded.config)
    multipliers.save(edit_file(out_path))
    click.echo(f"wrote {out_path} and {edit_file(out_path)} ({_changes(multipliers)} changed)")


@edit.command("revert")
@click.argument("edited", type=click.Path(exists=True))
@model_options
@click.option("--remove", "remove_path", type=click.Path(exists=True, dir_okay=False),
              help="Remove only this edit (*.edit.safetensors) from a composed one; default: remove all.")
@click.option("--out", required=True, type=click.Path(), help="Output folder or X.safetensors (as for apply).")
def revert(edited: str, remove_path: str | None, out: str, model_name, pretrained, checkpoint, config,
           device: str) -> None:
    """Undo an exported edit: rebuild from the base model (given with the model options)."""
    from sith.edits.apply import apply_multipliers
    from sith.edits.export import export_model, read_manifest
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
    export_model(result, Path(out), {"base_model": base.name, "base_hash": base.hash, "spec": None,
                                     "multipliers": remaining.to_manifest(), "reverted_from": Path(edited).name},
                 base.config)
    click.echo(f"wrote {out} ({_changes(remaining)} still edited)")


@edit.command("show")
@click.argument("edited", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest as JSON.")
def show(edited: str, as_json: bool) -> None:
    """Summarise the SITH manifest of an exported checkpoint (--json: the raw manifest)."""
    from sith.edits.export import read_manifest

    manifest = read_manifest(edited)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    for line in summary_lines(manifest):
        click.echo(line)


def summary_lines(manifest: dict) -> list[str]:
    """A readable summary of a manifest: base model, operations, what changed, predicted effect."""
    lines = [f"Edited checkpoint (format {manifest.get('format', '?')} v{manifest.get('version', '?')})",
             f"  base model: {manifest.get('base_model')} ({str(manifest.get('base_hash'))[:12]})"]
    spec = manifest.get("spec")
    if spec:
        for i, op in enumerate(spec.get("operations", [])):
            goal = f", target {op['target']:g}" if op.get("target") is not None else ""
            strength = f", α {op['strength']:g}" if op.get("strength") is not None else ""
            keep = f", preserving {', '.join(op['preserve'])}" if op.get("preserve") else ""
            neighbours = " (+ dictionary neighbours)" if op.get("preserve_neighbours", False) else ""
            anchor = f", anchor {op['anchor']}" if op.get("anchor", "auto") != "auto" else ""
            lines.append(f"  operation {i}: {op.get('action')} {', '.join(op.get('concepts', []))} with "
                         f"{op.get('operator', 'sith_scale')}{goal}{strength}{keep}{neighbours}{anchor}")
        lines += [f"  note: {n}" for n in manifest.get("notes") or [] if "anchored to" in n]
    else:
        source = manifest.get("source") or manifest.get("reverted_from")
        lines.append(f"  no spec (re-applied or reverted{f' from {source}' if source else ''})")
    mult = manifest.get("multipliers") or {}
    changed = mult.get("changed", [])
    maps = mult.get("maps", [])
    heads = sorted({(m[1], m[2]) for m in maps if m[0] == "head"} | {(c[0], c[1]) for c in changed})
    output = any(m[0] == "output" for m in maps)
    mlps = sorted({m[1] for m in maps if m[0] == "mlp"})
    lines.append(f"  changed: {len(changed)} singular value(s), {len(maps)} write map(s), {len(heads)} head(s)"
                 + (f", {len(mlps)} MLP output(s)" if mlps else "")
                 + (", visual.proj" if output else "") + f"; layers {mult.get('layers', [])}")
    if heads:
        shown = ", ".join(f"L{layer}H{head}" for layer, head in heads[:12])
        lines.append(f"  heads: {shown}{' …' if len(heads) > 12 else ''}")
    predicted = manifest.get("predicted") or []
    if predicted:
        lines.append("  predicted presence after the edit (data-free; 1 = untouched, 0 = removed; a suppress target "
                     "is corrected by the concept's prior, so 'after' can differ from the level asked):")
        lines.append(f"    {'concept':<16} {'role':<8} {'before':>6} {'after':>6}")
        for e in predicted:
            lines.append(f"    {e['concept']:<16} {e['role']:<8} {e.get('before', 1.0):>6.2f} {e['after']:>6.3f}")
    for warning in manifest.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    lines.append("  (sith edit show --json prints the full manifest)")
    return lines


def register(group: click.Group) -> None:
    group.add_command(edit)
