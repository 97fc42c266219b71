"""The `sith` command. Each command family lives in its own module and registers itself here."""

from __future__ import annotations

import importlib
import sys

import click

from sith.engine.errors import InvalidInput

# Modules that add commands to the group (each defines `register(group: click.Group)`).
COMMAND_MODULES: list[str] = ["sith.cli.analysis", "sith.cli.worker", "sith.cli.edits", "sith.cli.serve", "sith.cli.testbed", "sith.cli.adapt"]


class _Group(click.Group):
    """Turns InvalidInput into a one-line error instead of a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except InvalidInput as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="sith")
def main() -> None:
    """SITH: data-free interpretability and concept editing for CLIP vision towers."""


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(main)
