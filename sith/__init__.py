"""sith: data-free interpretability and concept editing for CLIP vision towers.

``sith.load("testbed-main")`` returns a ``sith.Model`` with ``explain``, ``find``,
``explain_image`` and ``edit`` (see ``sith.api``). The API is imported on first use, so
``import sith`` stays instant (torch and open_clip load only when a model does).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# names served lazily from sith.api
_API = ("load", "Model", "EditedModel", "ResultTable", "Explanation", "Hits", "ImageExplanation", "EditReport")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from sith import api

        return getattr(api, name)
    raise AttributeError(f"module 'sith' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
