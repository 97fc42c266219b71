"""A one-line progress bar on stderr for ``wait(progress=True)``; no dependency on rich/tqdm."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

ProgressArg = bool | Callable[[Any], None] | None


class ProgressBar:
    """Redraws ``kind  [#####.....]  42%  message`` in place; a newline when finished."""

    def __init__(self, stream: TextIO | None = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._last = ""
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, job: Any) -> None:
        p = min(max(float(job.progress), 0.0), 1.0)
        filled = int(round(p * self.width))
        line = f"{job.kind or 'job'}  [{'#' * filled}{'.' * (self.width - filled)}] {p:4.0%}  {job.message}"[:120]
        if job.done:
            line = f"{line}  {job.state}"
        if line == self._last:
            return
        if self._tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if job.done else ""))
        else:  # logs: one line per change
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line


def callback(progress: ProgressArg) -> Callable[[Any], None] | None:
    """Turn ``progress=`` (True, a callable, or falsy) into an update callback."""
    if progress is True:
        return ProgressBar()
    if callable(progress):
        return progress
    return None
