"""Field limits declared in the proto (``[(sith.v1.bounds) = {...}]``), read from the descriptors.

The server checks requests with :func:`check` before anything is queued, and the SDK runs the same
check before sending, so both reject the same inputs with the same field path and reason. A bound
exists once, in ``proto/sith/v1/*.proto``; nothing here restates a number.

Semantics per field kind:
* numbers: ``min``/``max`` inclusive; with ``default_value``, 0 means "unset, use the default" (the
  proto3 convention), so the check applies to non-zero values; ``optional`` fields are checked when set.
* repeated fields: ``min_items``/``max_items``; strings in them: ``max_length`` each.
* strings: ``max_length``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from sith_api.v1 import sith_pb2

__all__ = ["Violation", "BoundsError", "limits", "default", "violations", "check"]


@dataclass(frozen=True)
class Violation:
    """One field outside its declared bounds (``field`` is the path, e.g. ``spec.operations[0].strength``)."""

    field: str
    reason: str


class BoundsError(ValueError):
    """Raised by :func:`check`; ``violations`` lists every bad field (the first is in the message)."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        first = violations[0]
        super().__init__(f"{first.field}: {first.reason}")

    @property
    def field(self) -> str:
        return self.violations[0].field

    @property
    def reason(self) -> str:
        return self.violations[0].reason


def limits(message: type[Message] | Message | Descriptor, field: str) -> sith_pb2.Bounds:
    """The declared bounds of ``field`` (an empty Bounds when none are declared)."""
    descriptor = message if isinstance(message, Descriptor) else message.DESCRIPTOR
    options = descriptor.fields_by_name[field].GetOptions()
    if options.HasExtension(sith_pb2.bounds):
        return options.Extensions[sith_pb2.bounds]
    return sith_pb2.Bounds()


def default(message: type[Message] | Message, field: str) -> float:
    """The value an unset (0) numeric field stands for, as declared in the proto."""
    b = limits(message, field)
    if not b.HasField("default_value"):
        raise KeyError(f"{message.DESCRIPTOR.full_name}.{field} declares no default")
    return b.default_value


def value_or_default(message: Message, field: str) -> float:
    """The field's value, or its declared default when it is 0 (unset)."""
    value = getattr(message, field)
    return value if value else default(message, field)


def _fmt(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:g}"


def _number(value: float, b: sith_pb2.Bounds, path: str) -> Iterator[Violation]:
    if isinstance(value, float) and not math.isfinite(value):
        yield Violation(path, f"must be a finite number, got {value}")
        return
    low = b.min if b.HasField("min") else None
    high = b.max if b.HasField("max") else None
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            yield Violation(path, f"must be between {_fmt(low)} and {_fmt(high)}, got {_fmt(value)}")
        elif low is not None:
            yield Violation(path, f"must be at least {_fmt(low)}, got {_fmt(value)}")
        else:
            yield Violation(path, f"must be at most {_fmt(high)}, got {_fmt(value)}")


def _string(value: str, b: sith_pb2.Bounds, path: str) -> Iterator[Violation]:
    if b.HasField("max_length") and len(value) > b.max_length:
        yield Violation(path, f"longer than {b.max_length} characters ({len(value)})")


def violations(message: Message, path: str = "") -> list[Violation]:
    """Every field of ``message`` (recursively) outside its declared bounds."""
    return list(_walk(message, path))


def _walk(message: Message, path: str) -> Iterator[Violation]:
    for fd in message.DESCRIPTOR.fields:
        name = f"{path}.{fd.name}" if path else fd.name
        b = limits(message.DESCRIPTOR, fd.name)
        is_message = fd.type == FieldDescriptor.TYPE_MESSAGE
        repeated = fd.is_repeated
        if repeated and not (is_message and fd.message_type.GetOptions().map_entry):
            items = getattr(message, fd.name)
            if b.HasField("min_items") and len(items) < b.min_items:
                yield Violation(name, f"give at least {b.min_items}" if not items
                                else f"expected {b.min_items}..{b.max_items or 'any'} entries, got {len(items)}")
            if b.HasField("max_items") and len(items) > b.max_items:
                yield Violation(name, f"at most {b.max_items} entries, got {len(items)}")
            for i, item in enumerate(items):
                if is_message:
                    yield from _walk(item, f"{name}[{i}]")
                elif fd.type == FieldDescriptor.TYPE_STRING:
                    yield from _string(item, b, f"{name}[{i}]")
                elif fd.cpp_type in _NUMBERS:
                    yield from _number(item, b, f"{name}[{i}]")
            continue
        if is_message:
            if message.HasField(fd.name):
                yield from _walk(getattr(message, fd.name), name)
            continue
        if fd.has_presence and not message.HasField(fd.name):
            continue
        value = getattr(message, fd.name)
        if fd.type == FieldDescriptor.TYPE_STRING:
            yield from _string(value, b, name)
        elif fd.cpp_type in _NUMBERS:
            if b.HasField("default_value") and value == 0:
                continue
            yield from _number(value, b, name)


_NUMBERS = {FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
            FieldDescriptor.CPPTYPE_UINT64, FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT}


def check(message: Message, path: str = "") -> Message:
    """``message`` unchanged, or :class:`BoundsError` listing every field outside its bounds."""
    found = violations(message, path)
    if found:
        raise BoundsError(found)
    return message


def check_value(message: type[Message] | Message, field: str, value: float | str, path: str | None = None) -> None:
    """Check one caller-given value against ``field``'s bounds, 0 included (an SDK argument the
    caller set explicitly must be in range even where 0 would mean "default" on the wire)."""
    b = limits(message, field)
    path = path or field
    found = list(_string(value, b, path)) if isinstance(value, str) else list(_number(value, b, path))
    if found:
        raise BoundsError(found)
