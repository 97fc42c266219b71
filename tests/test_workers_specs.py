"""The API's EditSpec <-> the library's: a planned (defaults filled in) spec survives the way back."""

from __future__ import annotations

import pytest

from sith.edits.spec import DEFAULT_DEBIAS_TARGET, DEFAULT_SUPPRESS_TARGET, EditSpec
from sith.engine.errors import InvalidInput
from sith_api.v1 import sith_pb2 as pb
from sith_workers import specs

LIBRARY_SPECS = [
    {"operations": [{"concepts": ["red"]}]},                                             # every default
    {"conflicts": "last_wins", "operations": [
        {"concepts": ["water", "land"], "action": "suppress", "operator": "head_project", "target": 0.3,
         "preserve": ["sand"], "preserve_neighbours": False, "layers": [4, 5]},
        {"concepts": ["circle"], "action": "amplify", "strength": 2.0, "operator": "sith_scale",
         "select": {"rule": "top_n", "n": 3}}]},
    {"operations": [{"concepts": ["blue"], "action": "flip", "operator": "sith_scale",
                     "select": {"rule": "explicit", "vectors": [[5, 1, 0], [5, 2, 3]]}}]},
    {"operations": [{"concepts": ["blue"], "action": "scale", "strength": 0.5, "operator": "sith_scale",
                     "select": {"rule": "threshold", "threshold": 0.25}}]},
    {"operations": [{"concepts": ["water", "land"], "action": "debias"}]},
    {"operations": [{"concepts": ["red"], "anchor": "orange"}, {"concepts": ["blue"], "anchor": "none"}]},
]


@pytest.mark.parametrize("document", LIBRARY_SPECS)
def test_a_library_spec_survives_the_api_and_back(document):
    library = EditSpec.from_dict({"model": "testbed-main", **document})
    message = specs.from_library(library)
    assert specs.to_library(message, "testbed-main").to_dict() == library.to_dict()


def test_the_planned_spec_names_the_defaults_the_request_left_out():
    request = pb.EditSpec(operations=[pb.EditOperation(concepts=["red"], action=pb.EditOperation.SUPPRESS)])
    planned = specs.from_library(specs.to_library(request, "testbed-main")).operations[0]
    assert planned.operator == "head_mlp_orthogonal" and planned.target == pytest.approx(DEFAULT_SUPPRESS_TARGET)
    assert planned.select.rule == pb.Selection.AUTO and planned.preserve_neighbours
    assert not request.operations[0].operator and not request.operations[0].HasField("target")
    debias = pb.EditSpec(operations=[pb.EditOperation(concepts=["water", "land"], action=pb.EditOperation.DEBIAS)])
    planned = specs.from_library(specs.to_library(debias, "testbed-main")).operations[0]
    assert planned.action == pb.EditOperation.DEBIAS and planned.target == pytest.approx(DEFAULT_DEBIAS_TARGET)


def test_an_operation_without_an_action_is_refused_by_name():
    with pytest.raises(InvalidInput) as err:
        specs.to_library(pb.EditSpec(operations=[pb.EditOperation(concepts=["red"])]), "testbed-main")
    assert err.value.field == "operations[0].action"
