"""The edit specification: round trip, defaults, and every bad field named."""

from __future__ import annotations

import json
import math

import pytest

from sith.edits.multipliers import Multipliers
from sith.edits.spec import MAX_ABS_STRENGTH, EditSpec, Operation, explicit, threshold, top_n
from sith.engine.errors import InvalidInput


def _spec(**op) -> dict:
    base = {"concepts": ["red"], "action": "suppress"}
    base.update(op)
    return {"version": 1, "model": "testbed-main", "operations": [base]}


def test_round_trip_fills_defaults_and_is_stable():
    spec = EditSpec(model="m", operations=[
        Operation(["water", "land"], "suppress", layers=[-1, -2], select=top_n(4)),
        Operation(["red"], "amplify", select=threshold(0.3)),
        Operation(["blue"], "flip", select=explicit([(3, 1, 0), (3, 2, 5)])),
        Operation(["sky"], "scale", strength=0.5),
    ]).validate()
    again = EditSpec.from_json(spec.to_json())
    assert again.to_dict() == spec.to_dict()
    strengths = [op.strength for op in again.operations]
    assert strengths == [0.0, 1.5, -1.0, 0.5]
    assert again.operations[2].select.vectors == [(3, 1, 0), (3, 2, 5)]
    assert again.operations[3].select.rule == "auto"  # scale has no goal: the planner falls back to top-n


def test_a_single_concept_string_is_accepted():
    spec = EditSpec.from_dict(_spec(concepts="red"))
    assert spec.operations[0].concepts == ["red"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_strength_names_the_field(value):
    with pytest.raises(InvalidInput) as err:
        EditSpec.from_dict(_spec(action="scale", strength=value))
    assert err.value.field == "operations[0].strength"


def test_nan_in_json_text_is_rejected():
    text = json.dumps(_spec(action="scale", strength=1.0)).replace("1.0", "NaN")
    with pytest.raises(InvalidInput, match="finite") as err:
        EditSpec.from_json(text)
    assert err.value.field == "operations[0].strength"


@pytest.mark.parametrize("action,strength,match", [
    ("scale", MAX_ABS_STRENGTH + 0.5, "<= 10"),
    ("scale", -11, "<= 10"),
    ("suppress", 1.2, "suppress needs"),
    ("amplify", 0.5, "amplify needs"),
    ("flip", 0.5, "negative"),
    ("scale", None, "explicit strength"),
])
def test_strength_bounds_per_action(action, strength, match):
    with pytest.raises(InvalidInput, match=match) as err:
        EditSpec.from_dict(_spec(action=action, strength=strength))
    assert err.value.field == "operations[0].strength"


@pytest.mark.parametrize("patch,field", [
    ({"action": "erase"}, "operations[0].action"),
    ({"concepts": []}, "operations[0].concepts"),
    ({"concepts": ["red", ""]}, "operations[0].concepts[1]"),
    ({"select": {"rule": "top_n", "n": 0}}, "operations[0].select.n"),
    ({"select": {"rule": "threshold"}}, "operations[0].select.threshold"),
    ({"select": {"rule": "explicit", "vectors": [[1, 2]]}}, "operations[0].select.vectors[0]"),
    ({"select": {"rule": "explicit", "vectors": [[1, 2, 3], [1, 2, 3]]}}, "operations[0].select.vectors"),
    ({"select": {"rule": "best"}}, "operations[0].select.rule"),
    ({"layers": ["last"]}, "operations[0].layers[0]"),
    ({"colour": "red"}, "operations[0]"),
])
def test_bad_fields_are_named(patch, field):
    with pytest.raises(InvalidInput) as err:
        EditSpec.from_dict(_spec(**patch))
    assert err.value.field == field


def test_document_level_errors():
    with pytest.raises(InvalidInput) as err:
        EditSpec.from_dict({"model": "m", "operations": []})
    assert err.value.field == "operations"
    with pytest.raises(InvalidInput) as err:
        EditSpec.from_dict({**_spec(), "version": 2})
    assert err.value.field == "version"
    with pytest.raises(InvalidInput) as err:
        EditSpec.from_dict({**_spec(), "conflicts": "merge"})
    assert err.value.field == "conflicts"
    with pytest.raises(InvalidInput) as err:
        EditSpec.from_json("{not json")
    assert err.value.field == "spec"


def test_multipliers_round_trip_and_compose(tmp_path):
    import torch

    a = Multipliers({20: torch.tensor([[1.0, 0.0], [2.0, 1.0]])}, model_hash="h")
    b = Multipliers({20: torch.tensor([[3.0, 1.0], [0.5, -1.0]]), 21: torch.tensor([[0.0, 1.0], [1.0, 1.0]])})
    both = a.compose(b)
    assert torch.equal(both.values[20], torch.tensor([[3.0, 0.0], [1.0, -1.0]]))
    assert torch.equal(both.values[21], b.values[21])
    assert both.changed() == [(20, 0, 0, 3.0), (20, 0, 1, 0.0), (20, 1, 1, -1.0), (21, 0, 0, 0.0)]
    path = tmp_path / "edit.safetensors"
    both.save(path)
    loaded = Multipliers.load(path)
    assert loaded == both and loaded.model_hash == "h"
    with pytest.raises(InvalidInput, match="different base models"):
        a.compose(Multipliers({20: torch.ones(2, 2)}, model_hash="other"))
    with pytest.raises(InvalidInput, match="NaN"):
        Multipliers({0: torch.tensor([[float("nan")]])})
    with pytest.raises(InvalidInput, match="not a SITH multipliers"):
        Multipliers.from_bytes(b"garbage-bytes-here")
