"""`sith testbed generate|train|evaluate`: the synthetic ground-truth world and its models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import numpy as np
from rich.console import Console
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


@testbed.command("train")
@click.option("--preset", default="main", show_default=True, help="main, small, or a preset JSON path.")
@click.option("--steps", type=int, default=None, help="Override the step count (of every stage).")
@click.option("--threads", type=int, default=None, help="Override torch CPU threads.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Checkpoint folder (default sith/testbed/checkpoints/<name>).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def train_cmd(preset: str, steps: int | None, threads: int | None, out_dir: Path | None, device: str | None) -> None:
    """Train a testbed CLIP model and save it in open_clip's folder layout."""
    from sith.testbed.train import load_preset, train

    p = load_preset(preset)
    overrides = {k: v for k, v in (("steps", steps), ("threads", threads)) if v is not None}
    p.train = dataclasses.replace(p.train, **overrides)
    p.stages = [dataclasses.replace(stage, **overrides) for stage in p.stages]  # --steps: every stage
    summary = train(p, out_dir=out_dir, device=device, log=click.echo)
    click.echo(f"saved {summary['name']} after {summary['train_seconds']} s (final loss {summary['final_loss']})")


@testbed.command("evaluate")
@click.argument("model", default="main")
@click.option("--n-factor", default=2000, show_default=True)
@click.option("--n-spurious", default=1000, show_default=True)
@click.option("--n-retrieval", default=1000, show_default=True)
@click.option("--no-write", is_flag=True, help="Do not write <folder>/eval.json.")
def evaluate_cmd(model: str, n_factor: int, n_spurious: int, n_retrieval: int, no_write: bool) -> None:
    """Evaluate MODEL (a preset name such as main/small, or a checkpoint folder)."""
    from sith.testbed.checkpoint import CHECKPOINT_DIR
    from sith.testbed.evaluate import evaluate_folder, summary_rows

    folder = Path(model)
    if not folder.is_dir():
        folder = CHECKPOINT_DIR / f"testbed-{model.removeprefix('testbed-')}"
    if not folder.is_dir():
        raise InvalidInput("model", f"no checkpoint folder {model!r}")
    result = evaluate_folder(folder, write=not no_write, n_factor=n_factor, n_spurious=n_spurious,
                             n_retrieval=n_retrieval)
    table = Table(title=f"{folder.name}: held-out evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary_rows(result):
        table.add_row(name, f"{value:.3f}")
    Console().print(table)


def register(group: click.Group) -> None:
    group.add_command(testbed)
