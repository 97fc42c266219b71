"""Request checks done before anything is queued; each failure names the proto field path.

Limits that depend only on the request (ranges, counts, lengths) are declared in the proto and
checked by :func:`bounded` (``sith_api.bounds``, the same check the SDK runs); what is here needs
the model or the vocabulary (layer and head ranges, method names, request ids).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sith.engine.errors import InvalidInput
from sith.engine.models import VisionInfo
from sith.engine.sparse import METHODS
from sith_api import bounds


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


def bounded(request):
    """``request`` if every field is within the bounds the proto declares (else BoundsError)."""
    return bounds.check(request)


def value(message, field: str):
    """The field's value, or the default the proto declares for 0 (unset)."""
    return bounds.value_or_default(message, field)


REQUEST_ID = re.compile(r"[A-Za-z0-9._-]+")


def request_id(key: str, field: str = "request_id") -> str:
    """An optional idempotency key: empty, or characters of [A-Za-z0-9._-] (length: the proto's bound)."""
    if key and not REQUEST_ID.fullmatch(key):
        raise InvalidInput(field, "must be characters of A-Z a-z 0-9 . _ - only")
    return key


def method(value: str, field: str = "method") -> str:
    value = value or "comp"
    if value not in METHODS:
        import difflib

        raise InvalidInput(field, f"unknown method {value!r}; use one of {list(METHODS)}",
                           suggestions=difflib.get_close_matches(value, METHODS, n=3, cutoff=0.3))
    return value
