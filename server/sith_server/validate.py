"""Request checks done before anything is queued; each failure names the proto field path."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from sith.engine.errors import InvalidInput
from sith.engine.models import VisionInfo
from sith.engine.sparse import METHODS


def indices(values: Sequence[int], size: int, field: str, what: str) -> list[int] | None:
    """Negative-from-the-end indices -> sorted unique non-negative ones; empty -> None (default)."""
    if not values:
        return None
    out = set()
    for i, value in enumerate(values):
        if not -size <= value < size:
            raise InvalidInput(f"{field}[{i}]", f"{what} {value} is out of range (0..{size - 1} or -{size}..-1)")
        out.add(value % size)
    return sorted(out)


def layers(info: VisionInfo, values: Sequence[int], field: str = "layers") -> list[int] | None:
    return indices(values, info.layers, field, "layer")


def heads(info: VisionInfo, values: Sequence[int], field: str = "heads") -> list[int] | None:
    return indices(values, info.heads, field, "head")


def in_range(value: int | float, field: str, low: float, high: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(field, f"must be a finite number, got {value}")
    if not low <= value <= high:
        raise InvalidInput(field, f"must be between {low:g} and {high:g}, got {value:g}")


def count(items: Sequence, field: str, low: int, high: int) -> None:
    if not low <= len(items) <= high:
        if not items:
            raise InvalidInput(field, f"give at least {low}")
        raise InvalidInput(field, f"expected {low}..{high} entries, got {len(items)}")


def text(value: str, field: str, max_len: int = 1000) -> str:
    if len(value) > max_len:
        raise InvalidInput(field, f"longer than {max_len} characters")
    return value


REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def request_id(value: str, field: str = "request_id") -> str:
    """An optional idempotency key: empty, or 1-128 characters of [A-Za-z0-9._-]."""
    if value and not REQUEST_ID.fullmatch(value):
        raise InvalidInput(field, "must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value


def method(value: str, field: str = "method") -> str:
    value = value or "comp"
    if value not in METHODS:
        import difflib

        raise InvalidInput(field, f"unknown method {value!r}; use one of {list(METHODS)}",
                           suggestions=difflib.get_close_matches(value, METHODS, n=3, cutoff=0.3))
    return value
