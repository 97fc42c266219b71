"""The edit specification: a versioned JSON document naming concepts, actions and selection rules.

The same document travels through the CLI, the gRPC API and the exported checkpoint's manifest, so
validation lives here once: ``EditSpec.from_dict`` rejects every bad field with ``InvalidInput``
naming it (``operations[1].strength``), and defaults are filled in so a stored spec replays exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sith.edits.operators import PROJECTIONS, resolve_operator
from sith.engine.errors import InvalidInput

SPEC_VERSION = 1
ACTIONS = ("suppress", "amplify", "flip", "scale", "debias")
# Actions that lower the named concepts' presence to a level in [0, 1): "debias" is "suppress" with a
# milder default goal (a debias needs the tower to stop relying on a concept, not to stop seeing it).
SUPPRESSING = ("suppress", "debias")
RULES = ("auto", "top_n", "threshold", "explicit")
CONFLICT_RULES = ("reject", "last_wins")
# |α| above this stops being an "edit" and starts dominating the residual stream; the bound also
# keeps a typo (strength 100) from silently wrecking a checkpoint.
MAX_ABS_STRENGTH = 10.0
DEFAULT_AMPLIFY = 1.5
DEFAULT_TOP_N = 8
MAX_TOP_N = 100_000
# Default goals of a target-driven operation (predicted presence, operators.predicted_presence).
# The suppress level is chosen on validation seeds by experiments/frontier.py's rule
# (``default_target_choice``): the default operator's target that removes every testbed concept
# with 95 % confidence (Wilson bound of the recall ≤ 15 %), then keeps the most of everything else.
# 0.15 since 2026-11-29 (0.2 before: its removal of red on testbed-main was
# within the noise of a 45-image validation split; docs/edits.md "Frontier").
DEFAULT_SUPPRESS_TARGET = 0.15
# The debias level, chosen by the same rule over the water/land debias of both testbed models alone
# (``default_target_choice(..., kind="debias")``): meets the worst-group gain on both and keeps the
# most of the other factors. Since 2026-11-29 (before, a debias was a suppress at its target).
DEFAULT_DEBIAS_TARGET = 0.25
DEFAULT_FLIP_TARGET = -1.0
MAX_PRESERVE = 256
# ``anchor`` values that are not a concept name: the planner's rule, or no anchor.
ANCHOR_RULES = ("auto", "none")

Action = Literal["suppress", "amplify", "flip", "scale", "debias"]
Rule = Literal["auto", "top_n", "threshold", "explicit"]


def _int(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field_name, f"expected an integer, got {value!r}")
    return value


def _finite(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(field_name, f"expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInput(field_name, f"must be finite, got {value}")
    return value


def _known_keys(d: dict, allowed: set[str], field_name: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise InvalidInput(field_name, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


@dataclass
class Selection:
    """Which singular vectors an operation touches, after ranking them by relevance."""

    rule: Rule = "auto"
    n: int | None = None
    threshold: float | None = None
    vectors: list[tuple[int, int, int]] | None = None  # explicit (layer, head, index)

    def validate(self, field_name: str) -> None:
        if self.rule not in RULES:
            raise InvalidInput(f"{field_name}.rule", f"unknown rule {self.rule!r}; use one of {list(RULES)}")
        if self.rule == "auto":
            if self.n is not None or self.threshold is not None or self.vectors:
                raise InvalidInput(field_name, "the auto rule takes no n, threshold or vectors")
        elif self.rule == "top_n":
            n = _int(self.n if self.n is not None else DEFAULT_TOP_N, f"{field_name}.n")
            if not 1 <= n <= MAX_TOP_N:
                raise InvalidInput(f"{field_name}.n", f"must be between 1 and {MAX_TOP_N}, got {n}")
            self.n = n
        elif self.rule == "threshold":
            if self.threshold is None:
                raise InvalidInput(f"{field_name}.threshold", "the threshold rule needs a threshold")
            self.threshold = _finite(self.threshold, f"{field_name}.threshold")
        else:
            if not self.vectors:
                raise InvalidInput(f"{field_name}.vectors", "the explicit rule needs at least one (layer, head, index)")
            checked = []
            for i, item in enumerate(self.vectors):
                if not isinstance(item, (list, tuple)) or len(item) != 3:
                    raise InvalidInput(f"{field_name}.vectors[{i}]", f"expected [layer, head, index], got {item!r}")
                checked.append(tuple(_int(x, f"{field_name}.vectors[{i}]") for x in item))
            if len(set(checked)) != len(checked):
                raise InvalidInput(f"{field_name}.vectors", "lists the same vector twice")
            self.vectors = checked  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rule": self.rule}
        if self.rule == "auto":
            return d
        if self.rule == "top_n":
            d["n"] = self.n
        elif self.rule == "threshold":
            d["threshold"] = self.threshold
        else:
            d["vectors"] = [list(v) for v in self.vectors or []]
        return d

    @classmethod
    def from_dict(cls, d: Any, field_name: str = "select") -> Selection:
        if not isinstance(d, dict):
            raise InvalidInput(field_name, f"expected an object, got {type(d).__name__}")
        _known_keys(d, {"rule", "n", "threshold", "vectors"}, field_name)
        sel = cls(rule=d.get("rule", "auto"), n=d.get("n"), threshold=d.get("threshold"), vectors=d.get("vectors"))
        sel.validate(field_name)
        return sel


def auto() -> Selection:
    return Selection(rule="auto")


def top_n(n: int = DEFAULT_TOP_N) -> Selection:
    return Selection(rule="top_n", n=n)


def threshold(value: float) -> Selection:
    return Selection(rule="threshold", threshold=value)


def explicit(vectors: list[tuple[int, int, int]]) -> Selection:
    return Selection(rule="explicit", vectors=list(vectors))


def range_action(action: str) -> str:
    """The action whose α and target ranges ``action`` follows: a debias is a suppress (its own default
    target aside)."""
    return "suppress" if action in SUPPRESSING else action


def default_strength(action: str) -> float | None:
    return {"suppress": 0.0, "amplify": DEFAULT_AMPLIFY, "flip": -1.0}.get(range_action(action))


@dataclass
class Operation:
    """One action on one or several named concepts.

    ``operator`` says how the model is changed (operators.py; "auto" = the default operator).
    α (``strength``) is what the operator multiplies: the selected singular values (sith_scale,
    head_ablation) or the concept's component of the selected writers (head_project,
    output_projection): suppress ∈ [0, 1), amplify > 1, flip < 0, scale any value; |α| ≤ 10.

    Target-driven (``select.rule == "auto"``, or an explicit rule with a ``target``): the planner
    picks writers and/or solves α until the concept's predicted presence reaches ``target``
    (suppress: a level in [0, 1), default 0.15, aimed lower or higher by the concept's prior;
    debias: the same with default 0.25;
    amplify: a factor > 1, default the strength or 1.5;
    flip: a level < 0, default −1). With an explicit rule and no target, α defaults as before
    (suppress 0, amplify 1.5, flip −1): the expert override. ``preserve`` names concepts the plan
    must not move; ``preserve_neighbours`` adds the concepts' dictionary neighbours (plan.py).
    ``anchor`` (suppress and debias with a projection operator): a concept that takes over a share
    of what the edit removes, as UCE maps an erased concept onto an anchor concept; "auto" lets the
    planner choose (plan.py, ``anchor_for``), "none" turns it off.
    """

    concepts: list[str]
    action: Action = "suppress"
    strength: float | None = None
    layers: list[int] | None = None
    select: Selection = field(default_factory=auto)
    operator: str = "auto"
    target: float | None = None
    preserve: list[str] = field(default_factory=list)
    preserve_neighbours: bool = True
    anchor: str = "auto"

    @property
    def target_driven(self) -> bool:
        return self.target is not None

    def validate(self, field_name: str) -> None:
        if not isinstance(self.concepts, list) or not self.concepts:
            raise InvalidInput(f"{field_name}.concepts", "name at least one concept")
        for i, concept in enumerate(self.concepts):
            if not isinstance(concept, str) or not concept.strip():
                raise InvalidInput(f"{field_name}.concepts[{i}]", f"expected a non-empty string, got {concept!r}")
        self.concepts = [c.strip() for c in self.concepts]
        if self.action not in ACTIONS:
            raise InvalidInput(f"{field_name}.action", f"unknown action {self.action!r}; use one of {list(ACTIONS)}")
        self.operator = resolve_operator(self.operator, f"{field_name}.operator")
        if not isinstance(self.select, Selection):
            raise InvalidInput(f"{field_name}.select", "expected a Selection")
        self._check_preserve(field_name)
        self._check_anchor(f"{field_name}.anchor")
        explicit_strength = self.strength is not None
        if self.strength is not None or self.action == "scale" or self.select.rule != "auto" and self.target is None:
            self.strength = self._checked_strength(f"{field_name}.strength")
        if self.target is not None:
            if explicit_strength and self.select.rule != "auto":
                raise InvalidInput(f"{field_name}.target", "contradictory goals: a target needs the planner to choose "
                                   "the writers (select.rule 'auto') or the strength (leave strength unset); this "
                                   "operation fixes both")
            self.target = self._checked_target(f"{field_name}.target")
        elif self.select.rule == "auto":
            self.target = self._default_target(f"{field_name}.target")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not self.layers:
                raise InvalidInput(f"{field_name}.layers", "expected a non-empty list of layer indices")
            self.layers = [_int(x, f"{field_name}.layers[{i}]") for i, x in enumerate(self.layers)]
        self.select.validate(f"{field_name}.select")

    def _check_preserve(self, field_name: str) -> None:
        if not isinstance(self.preserve_neighbours, bool):
            raise InvalidInput(f"{field_name}.preserve_neighbours",
                               f"expected true or false, got {self.preserve_neighbours!r}")
        if isinstance(self.preserve, str):
            self.preserve = [self.preserve]
        if not isinstance(self.preserve, list):
            raise InvalidInput(f"{field_name}.preserve", "expected a list of concept names")
        if len(self.preserve) > MAX_PRESERVE:
            raise InvalidInput(f"{field_name}.preserve", f"at most {MAX_PRESERVE} concepts, got {len(self.preserve)}")
        cleaned = []
        for i, concept in enumerate(self.preserve):
            if not isinstance(concept, str) or not concept.strip():
                raise InvalidInput(f"{field_name}.preserve[{i}]", f"expected a non-empty string, got {concept!r}")
            concept = concept.strip()
            if concept in self.concepts:
                raise InvalidInput(f"{field_name}.preserve[{i}]", f"contradictory goals: {concept!r} is both edited "
                                   f"({self.action}) and preserved by this operation")
            if concept not in cleaned:
                cleaned.append(concept)
        self.preserve = cleaned

    def _check_anchor(self, field_name: str) -> None:
        if not isinstance(self.anchor, str) or not self.anchor.strip():
            raise InvalidInput(field_name, f"expected a concept name, 'auto' or 'none', got {self.anchor!r}")
        self.anchor = self.anchor.strip()
        if self.anchor in ANCHOR_RULES:
            return
        if self.anchor in self.concepts:
            raise InvalidInput(field_name, f"contradictory goals: {self.anchor!r} is both edited and the anchor "
                               "that takes over what the edit removes")
        if self.action not in SUPPRESSING or self.operator not in PROJECTIONS:  # their maps can carry an anchor
            raise InvalidInput(field_name, f"an anchor concept needs action suppress or debias and one of the "
                               f"operators {list(PROJECTIONS)}; this operation is {self.action} with "
                               f"{self.operator}")

    def _default_target(self, field_name: str) -> float | None:
        if self.action in SUPPRESSING:
            level = DEFAULT_SUPPRESS_TARGET if self.action == "suppress" else DEFAULT_DEBIAS_TARGET
            return level if self.strength is None or self.strength == 0 else self.strength
        if self.action == "amplify":
            return self.strength if self.strength is not None else DEFAULT_AMPLIFY
        if self.action == "flip":
            return self.strength if self.strength is not None else DEFAULT_FLIP_TARGET
        return None  # scale: no goal, the auto rule falls back to the top-n most relevant vectors

    def _checked_target(self, field_name: str) -> float:
        value = _finite(self.target, field_name)
        rules = {
            "suppress": (0.0 <= value < 1.0, f"{self.action} needs a target presence 0 <= target < 1"),
            "amplify": (1.0 < value <= MAX_ABS_STRENGTH,
                        f"amplify needs a target factor 1 < target <= {MAX_ABS_STRENGTH:g}"),
            "flip": (-MAX_ABS_STRENGTH <= value < 0.0,
                     "flip needs a negative target presence (-1 mirrors the concept)"),
            "scale": (False, "scale takes an explicit strength, not a target"),
        }
        ok, reason = rules[range_action(self.action)]
        if not ok:
            raise InvalidInput(field_name, f"{reason}, got {value:g}")
        return value

    def _checked_strength(self, field_name: str) -> float:
        if self.strength is None:
            value = default_strength(self.action)
            if value is None:
                raise InvalidInput(field_name, "the 'scale' action needs an explicit strength")
            return value
        value = _finite(self.strength, field_name)
        if abs(value) > MAX_ABS_STRENGTH:
            raise InvalidInput(field_name, f"|strength| must be <= {MAX_ABS_STRENGTH:g}, got {value:g}")
        rules = {
            "suppress": (0.0 <= value < 1.0, f"{self.action} needs 0 <= strength < 1 (0 removes the vectors)"),
            "amplify": (value > 1.0, "amplify needs strength > 1"),
            "flip": (value < 0.0, "flip needs a negative strength (-1 mirrors the vectors)"),
        }
        ok, reason = rules.get(range_action(self.action), (True, ""))
        if not ok:
            raise InvalidInput(field_name, f"{reason}, got {value:g}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return {
            "concepts": list(self.concepts),
            "action": self.action,
            "operator": self.operator,
            "strength": self.strength,
            "target": self.target,
            "layers": None if self.layers is None else list(self.layers),
            "select": self.select.to_dict(),
            "preserve": list(self.preserve),
            "preserve_neighbours": self.preserve_neighbours,
            "anchor": self.anchor,
        }

    @classmethod
    def from_dict(cls, d: Any, field_name: str = "operation") -> Operation:
        if not isinstance(d, dict):
            raise InvalidInput(field_name, f"expected an object, got {type(d).__name__}")
        _known_keys(d, {"concepts", "action", "operator", "strength", "target", "layers", "select", "preserve",
                        "preserve_neighbours", "anchor"}, field_name)
        concepts = d.get("concepts")
        if isinstance(concepts, str):
            concepts = [concepts]
        select = Selection.from_dict(d.get("select", {"rule": "auto"}), f"{field_name}.select")
        op = cls(concepts=concepts, action=d.get("action", "suppress"), strength=d.get("strength"),
                 layers=d.get("layers"), select=select, operator=d.get("operator", "auto"), target=d.get("target"),
                 preserve=d.get("preserve", []), preserve_neighbours=d.get("preserve_neighbours", True),
                 anchor=d.get("anchor", "auto"))
        op.validate(field_name)
        return op


_DIRECTION = {"suppress": "down", "amplify": "up", "flip": "down", "scale": "scale"}


def _direction(action: str) -> str:
    return _DIRECTION[range_action(action)]


_PAST = {"suppress": "suppressed", "debias": "debiased", "amplify": "amplified", "flip": "flipped", "scale": "scaled"}


def _check_contradictions(operations: list[Operation]) -> None:
    """One concept may not be pushed two ways, or be edited by one operation and preserved by another."""
    edited: dict[str, tuple[int, str]] = {}
    for i, op in enumerate(operations):
        for j, concept in enumerate(op.concepts):
            if concept in edited and _direction(edited[concept][1]) != _direction(op.action):
                k, action = edited[concept]
                raise InvalidInput(f"operations[{i}].concepts[{j}]", f"contradictory goals: {concept!r} is "
                                   f"{_PAST[action]} by operations[{k}] and {_PAST[op.action]} here")
            edited.setdefault(concept, (i, op.action))
    for i, op in enumerate(operations):
        for j, concept in enumerate(op.preserve):
            if concept in edited and edited[concept][0] != i:
                k, action = edited[concept]
                raise InvalidInput(f"operations[{i}].preserve[{j}]", f"contradictory goals: {concept!r} is preserved "
                                   f"here but {_PAST[action]} by operations[{k}]")
        if op.anchor in edited and edited[op.anchor][0] != i:
            k, action = edited[op.anchor]
            raise InvalidInput(f"operations[{i}].anchor", f"contradictory goals: {op.anchor!r} is the anchor here "
                               f"but {_PAST[action]} by operations[{k}]")


@dataclass
class EditSpec:
    """A model reference plus operations. ``conflicts`` decides what happens when two operations
    select the same singular vector: "reject" (default) fails naming both, "last_wins" lets the
    later operation's α replace the earlier one (never a product: the spec says what α a vector gets)."""

    model: str
    operations: list[Operation]
    version: int = SPEC_VERSION
    conflicts: Literal["reject", "last_wins"] = "reject"

    def validate(self) -> EditSpec:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidInput("model", "name the model to edit (name/tag, path, or model hash)")
        if self.version != SPEC_VERSION:
            raise InvalidInput("version", f"unsupported spec version {self.version!r}; this build reads {SPEC_VERSION}")
        if self.conflicts not in CONFLICT_RULES:
            raise InvalidInput("conflicts", f"unknown rule {self.conflicts!r}; use one of {list(CONFLICT_RULES)}")
        if not isinstance(self.operations, list) or not self.operations:
            raise InvalidInput("operations", "an edit needs at least one operation")
        for i, op in enumerate(self.operations):
            if not isinstance(op, Operation):
                raise InvalidInput(f"operations[{i}]", "expected an Operation")
            op.validate(f"operations[{i}]")
        _check_contradictions(self.operations)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model,
            "conflicts": self.conflicts,
            "operations": [op.to_dict() for op in self.operations],
        }

    @classmethod
    def from_dict(cls, d: Any) -> EditSpec:
        if not isinstance(d, dict):
            raise InvalidInput("spec", f"expected a JSON object, got {type(d).__name__}")
        _known_keys(d, {"version", "model", "conflicts", "operations"}, "spec")
        ops = d.get("operations")
        if not isinstance(ops, list) or not ops:
            raise InvalidInput("operations", "an edit needs at least one operation")
        version = d.get("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise InvalidInput("version", f"unsupported spec version {version!r}; this build reads {SPEC_VERSION}")
        spec = cls(
            model=d.get("model", ""),
            operations=[Operation.from_dict(op, f"operations[{i}]") for i, op in enumerate(ops)],
            version=version,
            conflicts=d.get("conflicts", "reject"),
        )
        return spec.validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> EditSpec:
        try:
            data = json.loads(s)
        except json.JSONDecodeError as exc:
            raise InvalidInput("spec", f"not valid JSON: {exc}") from exc
        return cls.from_dict(data)
