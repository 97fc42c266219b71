"""`sith --help` / `--version` answer without importing torch; the command listing matches the code;
tables keep their width when output is piped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click
from click.testing import CliRunner

from sith.cli import COMMANDS, main

HEAVY = ("torch", "open_clip", "numpy", "safetensors", "sith.engine.models")


def _imports_after(argv: list[str]) -> set[str]:
    """The heavy modules imported by running `sith ARGV` in a fresh interpreter."""
    code = ("import sys\nfrom sith.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print('IMPORTED=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("IMPORTED="), run.stdout
    return {m for m in last.removeprefix("IMPORTED=").split(",") if m}


def test_help_and_version_import_nothing_heavy():
    assert _imports_after(["--help"]) == set()
    assert _imports_after(["--version"]) == set()
    assert _imports_after(["serve", "--help"]) == set()  # a light command module stays light too


def test_help_and_version_answer_within_a_second_and_a_half():
    script = Path(sys.executable).with_name("sith")
    argv0 = [str(script)] if script.exists() else [sys.executable, "-c", "from sith.cli import main; main()"]
    for args in (["--help"], ["--version"]):
        best = float("inf")
        for _ in range(3):  # best of three: the machine is shared with other jobs
            started = time.perf_counter()
            run = subprocess.run([*argv0, *args], capture_output=True, text=True, timeout=60)
            best = min(best, time.perf_counter() - started)
            assert run.returncode == 0, run.stderr
        assert best < 1.5, f"sith {args[0]} took {best:.2f} s"
    assert "explain-image" in run.stdout or "version" in run.stdout


def test_listing_matches_each_commands_own_help():
    ctx = click.Context(main)
    names = main.list_commands(ctx)
    assert names == sorted(COMMANDS)
    for name in names:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.get_short_help_str(limit=1000) == COMMANDS[name][1], \
            f"`sith {name}`'s docstring changed: copy its first sentence into COMMANDS in sith/cli/__init__.py"


def test_every_command_module_registers_only_listed_commands():
    group = click.Group()
    modules = {module for module, _ in COMMANDS.values()}
    for module in modules:
        __import__(module, fromlist=["register"]).register(group)
    assert set(group.commands) == set(COMMANDS)


def test_help_lists_every_command_and_errors_stay_one_line():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in result.output
    bad = CliRunner().invoke(main, ["no-such-command"])
    assert bad.exit_code == 2 and "No such command" in bad.output


def test_piped_tables_are_not_cut_at_80_columns(monkeypatch):
    from rich.table import Table

    from sith.cli.console import PIPE_WIDTH, console

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table()
    for i in range(6):
        table.add_column(f"a rather long column {i}")
    table.add_row(*[f"value number {i} here" for i in range(6)])
    c = console()
    assert not c.is_terminal and c.width == PIPE_WIDTH
    with c.capture() as captured:
        c.print(table)
    widths = {len(line) for line in captured.get().splitlines() if line}
    assert max(widths) > 100  # one line per row, not squeezed into 80 columns
    monkeypatch.setenv("COLUMNS", "90")
    assert console().width == 90  # the user's COLUMNS still wins
    assert os.environ["COLUMNS"] == "90"
