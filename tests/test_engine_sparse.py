"""Sparse coding: COMP, NNOMP, top-k, matching pursuit, NNLS and fidelity (spec §3, §1.8)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

from sith.engine.errors import InvalidInput
from sith.engine.jointspace import JointSpace
from sith.engine.sparse import (
    SparseCodes,
    comp,
    encode,
    fidelity,
    matching_pursuit,
    nnls,
    nnomp,
    reconstruct,
    topk_cosine,
)


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def reference_comp(target: torch.Tensor, atoms: torch.Tensor, k: int, coherence: float) -> list[int]:
    """Spec §3.2 written one target at a time with scipy's NNLS, as an independent reference."""
    a = atoms.double().numpy()
    t = target.double().numpy()
    selected: list[int] = []
    residual = t.copy()
    for step in range(k):
        scores = a @ residual
        if step:
            scores = scores + coherence * (a @ a[selected].mean(axis=0))
            scores[selected] = -np.inf
        selected.append(int(np.argmax(scores)))
        coef, _ = scipy.optimize.nnls(a[selected].T, t)
        residual = t - a[selected].T @ coef
    return selected


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_nnls_matches_scipy(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    shared = torch.randn(1, 1, 16, generator=generator)
    support = torch.randn(200, k, 16, generator=generator) + 0.8 * shared  # correlated atoms
    targets = torch.randn(200, 16, generator=generator)
    ours = nnls(support.double(), targets.double()).numpy()
    for i in range(200):
        ref, _ = scipy.optimize.nnls(support[i].double().numpy().T, targets[i].double().numpy())
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)
    assert (ours >= 0).all()
    assert (ours == 0).any()  # the constraint is active somewhere, so the active set was exercised


def test_nnls_gram_handles_duplicate_atoms() -> None:
    atom = F.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    support = torch.cat([atom, atom])[None].double()  # the same atom twice: singular Gram
    target = 2.0 * atom.double()
    coef = nnls(support, target)
    assert torch.isfinite(coef).all()
    assert coef.sum().item() == pytest.approx(2.0, abs=1e-6)


def test_recovers_nonnegative_combination_of_orthogonal_atoms() -> None:
    atoms = unit(300, 64, seed=1)
    basis = torch.linalg.qr(torch.randn(64, 3, generator=torch.Generator().manual_seed(2)))[0].T  # 3 orthonormal
    atoms[[17, 101, 250]] = basis
    weights = torch.tensor([0.9, 0.5, 0.2])
    target = (weights[:, None] * basis).sum(0, keepdim=True)
    for codes in (comp(target, atoms, k=3, coherence=0.0), nnomp(target, atoms, k=3)):
        assert codes.indices[0].tolist() == [17, 101, 250]
        torch.testing.assert_close(codes.coefficients[0], weights, atol=1e-5, rtol=0)


def test_comp_zero_coherence_equals_nnomp() -> None:
    atoms, targets = unit(500, 32, seed=3), unit(40, 32, seed=4)
    a, b = comp(targets, atoms, k=6, coherence=0.0), nnomp(targets, atoms, k=6)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.coefficients, b.coefficients)


@pytest.mark.parametrize(("k", "coherence"), [(5, 0.0), (5, 0.3), (5, 1.0), (12, 0.3)])
def test_comp_matches_reference(k: int, coherence: float) -> None:
    atoms, targets = unit(400, 24, seed=5), unit(12, 24, seed=6)
    codes = comp(targets, atoms, k=k, coherence=coherence)
    for i in range(12):
        expected = reference_comp(targets[i], atoms, k, coherence)
        assert sorted(codes.indices[i].tolist()) == sorted(expected)
        # The warm-started refit equals a cold scipy NNLS on the final support.
        support = atoms[codes.indices[i]].double().numpy()
        ref, _ = scipy.optimize.nnls(support.T, targets[i].double().numpy())
        np.testing.assert_allclose(codes.coefficients[i].numpy(), ref, atol=1e-5)


def test_coherence_changes_the_pick() -> None:
    """After picking a, the residual favours b slightly, but c is nearly parallel to a."""
    a = torch.tensor([1.0, 0.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0, 0.0])
    c = F.normalize(torch.tensor([0.6, 0.0, 0.8, 0.0]), dim=0)
    atoms = torch.stack([a, b, c])
    target = F.normalize(torch.tensor([[1.0, 0.5, 0.45, 0.0]]), dim=1)
    plain = nnomp(target, atoms, k=2)
    coherent = comp(target, atoms, k=2, coherence=0.5)
    assert set(plain.indices[0].tolist()) == {0, 1}
    assert set(coherent.indices[0].tolist()) == {0, 2}


def test_batch_equals_one_at_a_time() -> None:
    atoms, targets = unit(700, 32, seed=7), unit(9, 32, seed=8)
    for method in ("comp", "nnomp", "topk", "mp"):
        together = encode(method, targets, atoms, k=4, batch_size=4)
        for i in range(9):
            alone = encode(method, targets[i : i + 1], atoms, k=4)
            assert torch.equal(alone.indices[0], together.indices[i]), method
            torch.testing.assert_close(alone.coefficients[0], together.coefficients[i], atol=1e-6, rtol=0)


def test_codes_are_sorted_nonnegative_and_distinct() -> None:
    atoms, targets = unit(300, 16, seed=9), unit(50, 16, seed=10)
    for method in ("comp", "nnomp", "topk", "mp"):
        codes = encode(method, targets, atoms, k=7)
        assert codes.indices.shape == codes.coefficients.shape == (50, 7)
        assert (codes.coefficients >= 0).all()
        assert (codes.coefficients[:, :-1] >= codes.coefficients[:, 1:]).all()
        assert all(len(set(row)) == 7 for row in codes.indices.tolist())


def test_topk_picks_most_similar_atoms() -> None:
    atoms, targets = unit(200, 16, seed=11), unit(5, 16, seed=12)
    codes = topk_cosine(targets, atoms, k=3)
    expected = (targets @ atoms.T).topk(3, dim=1).indices
    assert [sorted(r) for r in codes.indices.tolist()] == [sorted(r) for r in expected.tolist()]


def test_matching_pursuit_first_coefficient_is_top_correlation() -> None:
    atoms, targets = unit(200, 16, seed=13), unit(5, 16, seed=14)
    codes = matching_pursuit(targets, atoms, k=1)
    best = (targets @ atoms.T).max(dim=1)
    assert torch.equal(codes.indices[:, 0], best.indices)
    torch.testing.assert_close(codes.coefficients[:, 0], best.values.clamp_min(0))


def test_omp_reduces_residual_more_than_topk() -> None:
    atoms, targets = unit(1000, 32, seed=15), unit(64, 32, seed=16)
    err = {m: (targets - reconstruct(encode(m, targets, atoms, k=5), atoms)).norm(dim=1).mean() for m in ("nnomp", "topk")}
    assert err["nnomp"] < err["topk"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": -2}, "k"),
        ({"k": 11}, "k"),  # more than the 10 atoms
        ({"coherence": -0.1}, "coherence"),
        ({"coherence": float("nan")}, "coherence"),
        ({"method": "lasso"}, "method"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_parameters_name_the_field(kwargs: dict, field: str) -> None:
    atoms, targets = unit(10, 8, seed=17), unit(3, 8, seed=18)
    method = kwargs.pop("method", "comp")
    with pytest.raises(InvalidInput) as info:
        encode(method, targets, atoms, **kwargs)
    assert info.value.field == field


def test_bad_tensors_name_the_field() -> None:
    atoms, targets = unit(10, 8, seed=19), unit(3, 8, seed=20)
    bad_targets = targets.clone()
    bad_targets[1, 2] = float("nan")
    bad_atoms = atoms.clone()
    bad_atoms[4, 0] = float("inf")
    cases = [
        (bad_targets, atoms, "targets"),
        (targets, bad_atoms, "atoms"),
        (unit(3, 9, seed=21), atoms, "targets"),  # dimension mismatch
        (targets[0], atoms, "targets"),  # not 2-D
        (targets, atoms[:0], "atoms"),
    ]
    for t, a, field in cases:
        for method in ("comp", "topk", "mp"):
            with pytest.raises(InvalidInput) as info:
                encode(method, t, a, k=2)
            assert info.value.field == field


def test_fidelity_is_one_for_exact_reconstruction() -> None:
    """With an identity projection and no image mean, a target made of the atoms is recovered exactly."""
    dim = 12
    ln_post = nn.LayerNorm(dim)
    space = JointSpace(ln_post, torch.eye(dim), None)
    atoms = unit(50, dim, seed=22)
    vectors = 0.7 * atoms[3:4] + 0.3 * atoms[9:10]
    codes = comp(vectors, atoms, k=2, coherence=0.0)
    assert fidelity(codes, atoms, space, vectors).item() == pytest.approx(1.0, abs=1e-5)
    empty = SparseCodes(codes.indices, torch.zeros_like(codes.coefficients))
    assert fidelity(empty, atoms, space, vectors).item() == 0.0


def test_atom_statistics_are_the_cosine_mean_and_spread() -> None:
    from sith.engine.sparse import atom_statistics

    gen = torch.Generator().manual_seed(3)
    atoms = torch.nn.functional.normalize(torch.randn(12, 6, generator=gen), dim=-1)
    population = torch.nn.functional.normalize(torch.randn(50, 6, generator=gen), dim=-1)
    mean, std = atom_statistics(population, atoms, batch=7)
    cos = population @ atoms.T
    torch.testing.assert_close(mean, cos.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, cos.std(0, unbiased=False), atol=1e-5, rtol=0)


def test_specific_codes_rank_by_standardised_cosine() -> None:
    from sith.engine.sparse import encode, specific_codes

    gen = torch.Generator().manual_seed(4)
    atoms = torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    targets = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    mean = torch.zeros(20)
    mean[3] = 5.0  # atom 3 is close to every direction: it must never be picked first
    scale = torch.ones(20)
    codes = specific_codes("topk", targets, atoms, (mean, scale), k=1)
    z = targets @ atoms.T - mean
    assert torch.equal(codes.indices[:, 0], z.argmax(1))
    assert not bool((codes.indices == 3).any())
    assert bool((codes.coefficients >= 0).all())
    with pytest.raises(InvalidInput) as info:
        specific_codes("topk", targets, atoms, (mean[:3], scale), k=1)
    assert info.value.field == "stats"
    with pytest.raises(InvalidInput):
        specific_codes("mp", targets, atoms, (mean, scale), k=1)
    # Without statistics, encode standardises over the targets and their negatives.
    fallback = encode("specific", targets, atoms, k=2)
    assert fallback.indices.shape == (5, 2)
