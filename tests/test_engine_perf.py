"""Correctness of the performance paths: the float32 factor SVD (fast basis, fallbacks), the thread
rule and the per-process decomposition memo. No timing is asserted here (see benchmarks/)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import sith.engine.decomposition as decomposition
from sith.engine.decomposition import decompose, factor_svd
from sith.engine.errors import InvalidInput
from sith.engine.jointspace import directions_mean
from sith.engine.memo import DecompositionMemo, process_memo
from sith.engine.models import load_model
from sith.engine.threads import auto_threads, choose_threads


def _reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of A @ B in float64 from the dense product (the slow, obviously right way)."""
    return torch.linalg.svdvals(a.double() @ b.double())[:, : a.shape[2]]


def _check(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, v = factor_svd(a, b)
    h, d, r = a.shape
    assert u.shape == (h, d, r) and v.shape == (h, b.shape[2], r) and s.shape == (h, r)
    assert u.dtype == s.dtype == v.dtype == a.dtype
    ref = _reference(a, b)
    scale = ref[:, :1].clamp_min(1e-30)
    assert ((s.double() - ref).abs() / scale).max() <= rtol
    assert (s[:, :-1] >= s[:, 1:]).all()
    eye = torch.eye(r, dtype=torch.float64).expand(h, r, r)
    keep = (ref / scale > 1e-6).double()  # directions with σ = 0 are arbitrary but still orthonormal
    torch.testing.assert_close(u.double().mT @ u.double(), eye, atol=5e-5, rtol=0)
    torch.testing.assert_close(v.double().mT @ v.double(), eye, atol=5e-5, rtol=0)
    rebuilt = u.double() @ torch.diag_embed(s.double() * keep) @ v.double().mT
    product = a.double() @ b.double()
    assert ((rebuilt - product).norm(dim=(1, 2)) / product.norm(dim=(1, 2)).clamp_min(1e-30)).max() < 1e-5
    pivot = u.abs().argmax(dim=1, keepdim=True)
    assert (torch.gather(u, 1, pivot) > 0).all()
    return u, s, v


def test_factor_svd_matches_float64_on_random_factors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 256, 32, generator=g) / 16
    b = torch.randn(6, 32, 256, generator=g) / 16
    _check(a, b)


def test_ill_conditioned_factor_uses_the_explicit_basis(monkeypatch):
    """cond(A) ~ 1e5: A·R⁻¹ in float32 would lose orthonormality, so Q is formed instead."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(3, 200, 24, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -5, 24, dtype=torch.float64)
    a = (q * scales).float()
    b = torch.randn(3, 24, 200, generator=g) / 14
    calls = []
    original = torch.linalg.householder_product
    monkeypatch.setattr(torch.linalg, "householder_product", lambda *x: calls.append(1) or original(*x))
    u, _, v = factor_svd(a, b)
    assert calls, "the fast basis was used on an ill-conditioned factor"
    eye = torch.eye(24, dtype=torch.float64).expand(3, 24, 24)
    torch.testing.assert_close(u.double().mT @ u.double(), eye, atol=5e-5, rtol=0)
    s_ref = _reference(a, b)
    assert ((factor_svd(a, b)[1].double() - s_ref).abs() / s_ref[:, :1]).max() < 1e-5


def test_well_conditioned_factor_takes_the_fast_path(monkeypatch):
    calls = []
    original = torch.linalg.householder_product
    monkeypatch.setattr(torch.linalg, "householder_product", lambda *x: calls.append(1) or original(*x))
    g = torch.Generator().manual_seed(2)
    _check(torch.randn(2, 128, 16, generator=g), torch.randn(2, 16, 128, generator=g))
    assert not calls


def test_zero_head_and_repeated_singular_values():
    """An ablated head (B = 0) and a head whose σ are all equal: both singular paths stay exact."""
    g = torch.Generator().manual_seed(3)
    q_a, _ = torch.linalg.qr(torch.randn(3, 96, 8, generator=g))
    q_b, _ = torch.linalg.qr(torch.randn(3, 96, 8, generator=g))
    a = q_a * 2.0
    b = q_b.mT.clone()
    b[1] = 0.0  # ablated: every σ is 0
    u, s, v = _check(a, b)
    assert s[1].abs().max() == 0
    torch.testing.assert_close(s[0], torch.full((8,), 2.0))  # repeated σ


def test_rank_deficient_core_uses_the_qr_completion():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 80, 10, generator=g)
    b = torch.randn(2, 10, 80, generator=g)
    b[:, 5:] = 0.0  # rank 5 of 10
    _, s, _ = _check(a, b)
    assert (s[:, 5:] < 1e-5 * s[:, :1]).all()


def test_float64_inputs_stay_float64_and_wide_factors_work():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 64, 8, generator=g, dtype=torch.float64)
    b = torch.randn(2, 8, 64, generator=g, dtype=torch.float64)
    u, s, v = factor_svd(a, b)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, _reference(a, b), rtol=1e-12, atol=1e-12)
    wide_a = torch.randn(2, 6, 8, generator=g)  # d < r: R is not square
    wide_b = torch.randn(2, 8, 6, generator=g)
    u, s, v = factor_svd(wide_a, wide_b)
    torch.testing.assert_close(s[:, :6].double(), torch.linalg.svdvals(wide_a.double() @ wide_b.double()),
                               rtol=1e-5, atol=1e-5)


def test_core_svd_is_an_svd():
    g = torch.Generator().manual_seed(6)
    core = torch.randn(4, 12, 12, generator=g, dtype=torch.float64)
    u, s, v = decomposition._core_svd(core)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ v.mT, core)
    torch.testing.assert_close(s, torch.linalg.svdvals(core))


# ------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize(("cores", "load", "processes", "expected"), [
    (2, 0.1, 1, 2),   # idle machine: both cores
    (2, 0.6, 1, 1),   # one core busy: a second thread would wait at every barrier
    (2, 17.0, 1, 1),  # heavily shared: at least one
    (16, 3.2, 1, 13),
    (16, 0.0, 4, 4),  # a pool of four processes shares the idle cores
])
def test_auto_threads_rule(cores, load, processes, expected):
    assert auto_threads(cores, load, processes) == expected


def test_choose_threads_precedence():
    assert choose_threads({"SITH_THREADS": "3"}, cores=2, load=0.0) == 3
    assert choose_threads({"OMP_NUM_THREADS": "1"}, cores=2, load=0.0) is None  # explicit OMP stands
    assert choose_threads({"SITH_THREADS": "auto", "OMP_NUM_THREADS": "1"}, cores=2, load=0.0) == 2
    assert choose_threads({}, cores=2, load=1.8) == 1
    for bad in ("0", "-2", "two"):
        with pytest.raises(InvalidInput) as err:
            choose_threads({"SITH_THREADS": bad})
        assert err.value.field == "SITH_THREADS"


# ---------------------------------------------------------------------------------------- memo

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 8, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
}


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CFG)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    process_memo().clear()
    return tmp_path


def _count_layers(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = decomposition.decompose_layer

    def counting(block, heads, layer):
        seen.append(layer)
        return original(block, heads, layer)

    for module in ("sith.engine.decomposition", "sith.engine.jointspace", "sith.engine.analysis"):
        monkeypatch.setattr(f"{module}.decompose_layer", counting)
    return seen


def test_each_layer_is_decomposed_once_per_process(tiny, monkeypatch):
    seen = _count_layers(monkeypatch)
    loaded = load_model(config=tiny)
    first = decompose(loaded, [1, 2])
    mean = directions_mean(loaded)  # every layer; 1 and 2 come from the memo
    again = decompose(loaded, [2])
    assert sorted(seen) == [0, 1, 2]
    assert again[2] is first[2]
    twin = load_model(config=tiny)  # a second load of the same weights shares the entries
    torch.testing.assert_close(directions_mean(twin), mean)
    assert sorted(seen) == [0, 1, 2]


def test_in_place_weight_change_is_not_served_stale(tiny, monkeypatch):
    seen = _count_layers(monkeypatch)
    loaded = load_model(config=tiny)
    before = decompose(loaded, [0])[0]
    with torch.no_grad():
        loaded.model.visual.transformer.resblocks[0].attn.out_proj.weight.mul_(2.0)
    after = decompose(loaded, [0])[0]
    assert seen == [0, 0]
    torch.testing.assert_close(after.S, 2 * before.S)


def test_memo_budget_evicts_least_recently_used(tiny):
    loaded = load_model(config=tiny)
    calls = []

    def compute(layer):
        calls.append(layer)
        return decomposition.decompose_layer(loaded.model.visual.transformer.resblocks[layer], 4, layer)

    one = compute(0)
    size = sum(t.numel() * t.element_size() for t in (one.U, one.S, one.V))
    memo = DecompositionMemo(budget=2 * size)
    for layer in (0, 1, 0, 2, 0, 1):
        memo.layer_svd(loaded, layer, lambda layer=layer: compute(layer))
    # 0 stays hot; 1 is evicted when 2 arrives, so it is computed again at the end
    assert calls[1:] == [0, 1, 2, 1] and len(memo) == 2
    assert DecompositionMemo(budget=0).layer_svd(loaded, 0, lambda: one) is one


# ------------------------------------------------------------------------------------- loading


def test_loading_a_folder_never_initialises_randomly(tiny, monkeypatch):
    """Weights come straight from the file (meta-device build + assignment), equal to what was saved."""
    from safetensors.torch import load_file

    def refuse(tensor, *args, **kwargs):
        if tensor.is_meta:  # building the skeleton: no memory, no values
            return tensor
        raise AssertionError("random initialisation of real memory while loading a checkpoint")

    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, refuse)
    loaded = load_model(config=tiny)
    monkeypatch.undo()
    saved = load_file(str(tiny / "open_clip_model.safetensors"))
    state = loaded.model.state_dict()
    assert set(saved) <= set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert not any(t.is_meta for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
    reference = open_clip.model.CLIP(**TINY_CFG)
    assert torch.equal(loaded.model.attn_mask, reference.attn_mask)  # rebuilt, not loaded
    tokens = loaded.tokenizer(["a red cube"])
    reference.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_text(tokens), reference.eval().encode_text(tokens))


def test_loaded_weights_do_not_depend_on_the_file(tiny):
    """safetensors maps files; a loaded model must survive its file being rewritten (no SIGBUS, no change)."""
    loaded = load_model(config=tiny)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    (tiny / "open_clip_model.safetensors").write_bytes(b"\0" * 64)  # truncate and overwrite in place
    after = loaded.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_buffers_only_the_constructor_knows_are_rebuilt(tiny, monkeypatch):
    """A non-persistent buffer without a known builder comes from one ordinary construction (the fallback)."""
    original = open_clip.model.CLIP.__init__

    def with_extra(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register_buffer("extra", torch.arange(3.0), persistent=False)

    monkeypatch.setattr(open_clip.model.CLIP, "__init__", with_extra)
    loaded = load_model(config=tiny)
    assert torch.equal(loaded.model.extra, torch.arange(3.0))
    assert not loaded.model.attn_mask.is_meta
    assert "_sith_cfg" not in vars(loaded.model)
