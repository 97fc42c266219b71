"""Rich consoles for the CLI whose tables keep their natural width when output is piped or captured.

Rich falls back to 80 columns whenever it cannot find a terminal size (a pipe into ``less`` or a
file, a notebook cell running ``!sith find``, CI logs), and then squeezes or wraps every table
column. Here a console that is not writing to a terminal renders up to ``PIPE_WIDTH`` columns
instead (tables only take the width they need), and ``COLUMNS`` still wins when it is set. In a
terminal the terminal's own width applies, as usual.
"""

from __future__ import annotations

import os

from rich.console import Console, ConsoleDimensions

PIPE_WIDTH = 240


class SithConsole(Console):
    """A rich Console that is wide, not 80 columns, when its output is not a terminal."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(PIPE_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


def console(stderr: bool = False) -> Console:
    """The console every command prints tables with (stdout, or stderr for status lines)."""
    return SithConsole(stderr=stderr)
