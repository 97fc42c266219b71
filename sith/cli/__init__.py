"""The `sith` command. Each command family lives in its own module and registers itself here.

Command modules are imported only when one of their commands runs (or its own ``--help`` is asked
for): they pull in torch and open_clip, which take seconds to import, and ``sith --help`` /
``sith --version`` should answer at once. The group's help lists the commands from ``COMMANDS``
below (name -> module, one-line help); ``tests/test_cli_startup.py`` checks that those lines match
the commands' own docstrings, so the listing cannot drift from the code.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, MutableMapping

import click

from sith.engine.errors import InvalidInput

# name -> (module defining `register(group)`, the command's one-line help as `sith --help` shows it)
COMMANDS: dict[str, tuple[str, str]] = {
    "adapt": ("sith.cli.adapt", "Fine-tuning deltas, basis stability and cross-model head matching."),
    "decompose": ("sith.cli.analysis",
                  "Per-head SVD of the folded, centred W_VO: singular value spectra per layer and head."),
    "edit": ("sith.cli.edits",
             "Suppress, amplify, flip or scale concepts by name in a CLIP vision tower (data-free)."),
    "explain": ("sith.cli.analysis",
                "Explain attention heads: each singular vector as a few concepts (with a calibrated confidence), "
                "and each head's theme."),
    "explain-image": ("sith.cli.image",
                      "Which heads and singular vectors make up one image's embedding, and what they mean."),
    "find": ("sith.cli.analysis", "Rank every singular vector of the analysed layers by relevance to CONCEPTS."),
    "serve": ("sith.cli.serve", "Run the SITH gRPC service until SIGTERM/Ctrl-C."),
    "testbed": ("sith.cli.testbed",
                "Synthetic image-caption world with known factors, and CLIP models trained on it."),
    "worker": ("sith.cli.worker",
               "Consume jobs (decompose, explain, find, edit, ...) from Redis until SIGTERM/Ctrl-C."),
}
HELP_ONLY = "sith.help_only"  # ctx.meta flag: the command line asks for help somewhere
# Kept for callers that iterate the command modules (each imported once, in this order).
COMMAND_MODULES: list[str] = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


def _shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to fit ``limit`` columns, "..." marking the cut (click's style)."""
    if len(text) <= limit:
        return text
    words, out = text.split(), ""
    for word in words:
        if len(out) + len(word) + 1 + 3 > limit:
            break
        out = f"{out} {word}" if out else word
    return out.rstrip(",;:") + "..."


class _LazyCommands(MutableMapping):
    """``Group.commands`` that imports a command's module the first time the command is looked up."""

    def __init__(self, group: click.Group) -> None:
        self._group = group
        self._loaded: dict[str, click.Command] = {}

    def _load(self, name: str) -> None:
        if name not in self._loaded and name in COMMANDS:
            importlib.import_module(COMMANDS[name][0]).register(self._group)

    def __getitem__(self, name: str) -> click.Command:
        self._load(name)
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in COMMANDS

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._loaded) | set(COMMANDS)))

    def __len__(self) -> int:
        return len(set(self._loaded) | set(COMMANDS))


class _Group(click.Group):
    """Loads command modules lazily and turns InvalidInput into a one-line error instead of a traceback."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands(self)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click would import every module to read its short help; the registry already has it.
        names = [n for n in self.list_commands(ctx) if n in COMMANDS]
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = [(n, _shorten(COMMANDS[n][1], limit)) for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[HELP_ONLY] = "--help" in args
        return super().parse_args(ctx, args)

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
    if click.get_current_context().meta.get(HELP_ONLY):
        return  # `sith CMD --help` only prints: no torch import (configure_threads imports it)
    from sith.engine.threads import configure_threads  # lazy: keeps torch off the --help path

    configure_threads()  # one torch thread per idle core (SITH_THREADS overrides)
