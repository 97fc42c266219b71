"""apply_multipliers applies rank-one write maps without forming dense d×d matrices (issue 16, target 8).

The fast path (rows − (1 − a)(rows u) vᵀ, value factors read once per layer) must write the same
weights as the dense reference (rows @ T with T = write_matrix(...), factors read per head).
"""

from __future__ import annotations

import copy

import pytest
import torch
from edits_fixtures import tiny_loaded

from sith.edits import apply as apply_mod
from sith.edits.apply import apply_multipliers
from sith.edits.multipliers import Multipliers, WriteMap
from sith.engine.decomposition import decompose
from sith.engine.towers import adapter_for

LAYERS = [0, 1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    loaded = tiny_loaded(tmp_path_factory.mktemp("maps"))
    decomposition = decompose(loaded, LAYERS)
    width = adapter_for(loaded.model).width
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(2):
        u = torch.randn(width, generator=gen, dtype=torch.float64)
        v = torch.randn(width, generator=gen, dtype=torch.float64)
        pairs.append((u, v / float(v @ u)))                 # vᵀu = 1
    heads, rank = decomposition[0].S.shape
    alpha = {layer: torch.ones(heads, rank) for layer in LAYERS}
    alpha[1][0, :2] = 0.25
    maps = [WriteMap("head", 0, 1, 0, 0.3), WriteMap("head", 0, 1, 1, 1.7), WriteMap("head", 1, 0, 1, 0.0),
            WriteMap("mlp", 0, -1, 0, 0.5), WriteMap("mlp", 1, -1, 1, -0.5), WriteMap("mlp", 1, -1, 0, 2.0)]
    return loaded, decomposition, Multipliers(alpha, loaded.hash, pairs, maps)


def _dense_reference(model, mult: Multipliers, decomposition):
    ref = copy.deepcopy(model)
    tower = adapter_for(ref)
    for layer, alpha in mult.values.items():
        for head in range(tower.num_heads):
            right = mult.write_matrix("head", layer, head)
            if right is None and bool((alpha[head] == 1.0).all()):
                continue
            apply_mod.rewrite_head(tower.blocks[layer], tower.num_heads, head, decomposition[layer], alpha[head], right)
    for site, layer, _ in mult.mapped_writers():
        if site == "mlp":
            w = tower.mlp_output(layer)
            tower.write_mlp_output(layer, w.double() @ mult.write_matrix("mlp", layer))
    return ref


def test_rank_one_maps_match_the_dense_products(setup) -> None:
    loaded, decomposition, mult = setup
    with torch.no_grad():
        fast = apply_multipliers(loaded.model, mult, decomposition).state_dict()
        dense = _dense_reference(loaded.model, mult, decomposition).state_dict()
        base = loaded.model.state_dict()
    changed = [k for k in base if not torch.equal(base[k], fast[k])]
    assert any("mlp" in k for k in changed) and any("out_proj" in k for k in changed)
    for key in base:
        scale = float(dense[key].abs().max()) or 1.0
        assert float((fast[key] - dense[key]).abs().max()) <= 1e-6 * scale, key


def test_value_factors_are_read_once_per_layer(setup, monkeypatch) -> None:
    loaded, decomposition, mult = setup
    calls = []
    original = apply_mod.vo_factors
    monkeypatch.setattr(apply_mod, "vo_factors", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        apply_multipliers(loaded.model, mult, decomposition, skip_unchanged=False)
    assert len(calls) == len(LAYERS)                         # not once per head
