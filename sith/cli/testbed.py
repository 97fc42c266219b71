"""`sith testbed generate|train|evaluate`: the synthetic ground-truth world and its models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
from rich.table import Table

from sith.engine.errors import InvalidInput


@click.group("testbed")
def testbed() -> None:
    """Synthetic image-caption world with known factors, and CLIP models trained on it."""


@testbed.command("generate")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-n", "--count", default=64, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--distribution", "dist_name", default="natural", show_default=True,
              help="natural, main-mix or spurious-train.")
def generate(out_dir: Path, count: int, seed: int, dist_name: str) -> None:
    """Write COUNT images as PNGs plus captions.jsonl (caption and factor labels per image)."""
    import numpy as np
    from PIL import Image

    from sith.testbed.spurious import distribution
    from sith.testbed.world import sample

    if count < 1:
        raise InvalidInput("count", "must be at least 1")
    dist = distribution(dist_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "captions.jsonl").open("w", encoding="utf-8") as lines:
        for i in range(count):
            s = sample(dist, seed, i)
            name = f"{i:06d}.png"
            Image.fromarray((s.image * 255.0 + 0.5).astype(np.uint8)).save(out_dir / name)
            lines.write(json.dumps({"file": name, "caption": s.caption, **dataclasses.asdict(s.scene)}) + "\n")
    click.echo(f"wrote {count} images to {out_dir}")


def default_train_dir(name: str) -> Path:
    """Where ``sith testbed train`` saves by default: the user's data folder, never the installed package."""
    from sith.engine.cache import data_dir

    return data_dir() / "testbed" / name


@testbed.command("train")
@click.option("--preset", default="main", show_default=True, help="main, small, siglip, timm, or a preset JSON path.")
@click.option("--steps", type=int, default=None, help="Override the step count (of every stage).")
@click.option("--threads", type=int, default=None, help="Override torch CPU threads.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Checkpoint folder (default $SITH_DATA_DIR/testbed/<name>, i.e. ~/.cache/sith/testbed/<name>).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def train_cmd(preset: str, steps: int | None, threads: int | None, out_dir: Path | None, device: str | None) -> None:
    """Train a testbed CLIP model and save it in open_clip's folder layout."""
    from sith.testbed.train import load_preset, train

    p = load_preset(preset)
    overrides = {k: v for k, v in (("steps", steps), ("threads", threads)) if v is not None}
    p.train = dataclasses.replace(p.train, **overrides)
    p.stages = [dataclasses.replace(stage, **overrides) for stage in p.stages]  # --steps: every stage
    folder = out_dir if out_dir is not None else default_train_dir(p.name)
    summary = train(p, out_dir=folder, device=device, log=click.echo)
    click.echo(f"saved {summary['name']} to {folder} after {summary['train_seconds']} s "
               f"(final loss {summary['final_loss']})")


def _reference(model: str) -> str:
    """A preset's short name (``main``, ``small``, ``siglip``, ``timm``, …) names the shipped testbed model;
    anything else is a model reference."""
    from sith.testbed.train import list_presets

    return f"testbed-{model}" if model in list_presets() else model


@testbed.command("evaluate")
@click.argument("model", default="main")
@click.option("--n-factor", default=2000, show_default=True)
@click.option("--n-spurious", default=1000, show_default=True)
@click.option("--n-retrieval", default=1000, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full result as JSON here (default ./<model>.eval.json).")
@click.option("--no-write", is_flag=True, help="Only print the table; write no JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON instead of the table.")
@click.option("--device", default="cpu", show_default=True)
def evaluate_cmd(model: str, n_factor: int, n_spurious: int, n_retrieval: int, out_path: Path | None,
                 no_write: bool, as_json: bool, device: str) -> None:
    """Zero-shot, worst-group and retrieval scores of MODEL on held-out testbed images.

    MODEL is main/small/siglip/timm (the shipped testbed models) or any model reference: testbed-main, a
    checkpoint folder, an edited model (`sith edit apply --out`), hf-hub:ORG/REPO, ...
    """
    from sith.cli.console import console
    from sith.testbed.evaluate import evaluate_reference, summary_rows, write_result

    if out_path is not None and no_write:
        raise InvalidInput("--out", "--out and --no-write contradict each other")
    result = evaluate_reference(_reference(model), device=device, n_factor=n_factor, n_spurious=n_spurious,
                                n_retrieval=n_retrieval)
    if not no_write:
        target = out_path or Path(f"{Path(str(result['model'])).name.replace('/', '-')}.eval.json")
        write_result(result, target)
        click.echo(f"wrote {target}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{result['model']}: held-out evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary_rows(result):
        table.add_row(name, f"{value:.3f}")
    console().print(table)


def register(group: click.Group) -> None:
    group.add_command(testbed)
