"""sith.v1.EditSpec (the API's canonical, stored form) <-> sith.edits.spec.EditSpec (the library's).

The library validates its spec (``EditSpec.from_dict``, InvalidInput naming ``operations[i]...``);
this module only renames enums to the library's words and leaves unset fields out, so the library's
defaults apply. The server calls it once to validate a request (then stores the proto), and the
worker calls it again to plan: the proto is the only form that is stored or sent. The way back,
``from_library``, reports the spec as planned (defaults filled in) in an EditPlan.
"""

from __future__ import annotations

from typing import Any

from sith.edits import spec as library
from sith_api.v1 import sith_pb2 as pb

ACTIONS = {pb.EditOperation.SUPPRESS: "suppress", pb.EditOperation.AMPLIFY: "amplify",
           pb.EditOperation.FLIP: "flip", pb.EditOperation.SCALE: "scale", pb.EditOperation.DEBIAS: "debias"}
RULES = {pb.Selection.TOP_N: "top_n", pb.Selection.THRESHOLD: "threshold", pb.Selection.EXPLICIT: "explicit",
         pb.Selection.AUTO: "auto", pb.Selection.RULE_UNSPECIFIED: "auto"}
CONFLICTS = {pb.EditSpec.CONFLICTS_UNSPECIFIED: "reject", pb.EditSpec.REJECT: "reject",
             pb.EditSpec.LAST_WINS: "last_wins"}


def _selection(select: pb.Selection) -> dict[str, Any]:
    rule = RULES.get(select.rule, "")
    d: dict[str, Any] = {"rule": rule or str(select.rule)}
    if select.n:
        d["n"] = select.n
    if rule == "threshold":
        d["threshold"] = select.threshold
    if select.vectors:
        d["vectors"] = [[v.layer, v.head, v.index] for v in select.vectors]
    return d


def _operation(op: pb.EditOperation) -> dict[str, Any]:
    d: dict[str, Any] = {"concepts": list(op.concepts), "action": ACTIONS.get(op.action, "")}
    if op.HasField("strength"):
        d["strength"] = op.strength
    if op.layers:
        d["layers"] = list(op.layers)
    if op.HasField("select"):
        d["select"] = _selection(op.select)
    if op.operator and op.operator != "auto":
        d["operator"] = op.operator
    if op.HasField("target"):
        d["target"] = op.target
    if op.preserve:
        d["preserve"] = list(op.preserve)
    if op.HasField("preserve_neighbours"):
        d["preserve_neighbours"] = op.preserve_neighbours
    if op.anchor:
        d["anchor"] = op.anchor
    return d


def to_dict(spec: pb.EditSpec, model: str) -> dict[str, Any]:
    """The library's spec document for ``spec``, planned on ``model`` (a worker model reference)."""
    return {"version": spec.version or library.SPEC_VERSION, "model": model,
            "conflicts": CONFLICTS.get(spec.conflicts, str(spec.conflicts)),
            "operations": [_operation(op) for op in spec.operations]}


def to_library(spec: pb.EditSpec, model: str) -> library.EditSpec:
    """The validated library spec (InvalidInput naming the library's field path on bad input)."""
    for i, op in enumerate(spec.operations):
        if op.action not in ACTIONS:
            from sith.engine.errors import InvalidInput

            raise InvalidInput(f"operations[{i}].action", "set an action: SUPPRESS, DEBIAS, AMPLIFY, FLIP or SCALE")
    return library.EditSpec.from_dict(to_dict(spec, model))


def from_library(spec: library.EditSpec) -> pb.EditSpec:
    """The library's (validated, defaults filled in) spec as the API's EditSpec: the inverse of
    ``to_library`` up to the model reference, which the EditPlan's ``model`` carries."""
    actions = {word: value for value, word in ACTIONS.items()}
    # the explicit enum value of each word (the UNSPECIFIED values map to the same words)
    rules = {word: value for value, word in RULES.items() if value != pb.Selection.RULE_UNSPECIFIED}
    conflicts = {word: value for value, word in CONFLICTS.items() if value != pb.EditSpec.CONFLICTS_UNSPECIFIED}
    out = pb.EditSpec(version=spec.version, conflicts=conflicts[spec.conflicts])
    for op in spec.operations:
        select = pb.Selection(rule=rules[op.select.rule], n=op.select.n if op.select.rule == "top_n" else 0,
                              threshold=op.select.threshold if op.select.rule == "threshold" else 0.0,
                              vectors=[pb.VectorRef(layer=a, head=b, index=c) for a, b, c in op.select.vectors or []])
        message = out.operations.add(concepts=op.concepts, action=actions[op.action], layers=op.layers or [],
                                     select=select, operator=op.operator, preserve=op.preserve,
                                     preserve_neighbours=op.preserve_neighbours, anchor=op.anchor)
        if op.strength is not None:
            message.strength = op.strength
        if op.target is not None:
            message.target = op.target
    return out
