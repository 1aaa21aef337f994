"""Closed-form and hand-computed checks of the kernels, MMD and E-distance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from pertflow.ops.kernels import (
    DEFAULT_SCALES,
    edistance,
    median_sq_dist,
    mmd2_rbf,
    pairwise_dists,
    pairwise_sq_dists,
    rbf_kernel,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# --- pairwise distances ---------------------------------------------------------------------


def test_pairwise_sq_dists_matches_brute_force():
    x, y = _randn(7, 3, seed=1), _randn(5, 3, seed=2)
    brute = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(pairwise_sq_dists(x, y), brute)
    within = pairwise_sq_dists(x)
    assert torch.all(torch.diagonal(within) == 0)
    torch.testing.assert_close(within, ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


def test_pairwise_sq_dists_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same number of features"):
        pairwise_sq_dists(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        pairwise_sq_dists(torch.zeros(3))


def test_pairwise_dists_exact_for_coincident_points():
    x = _randn(6, 4, seed=6)
    d = pairwise_dists(x, x)
    assert torch.all(torch.diagonal(d) == 0)
    torch.testing.assert_close(d**2, pairwise_sq_dists(x, x) * (1 - torch.eye(6, dtype=x.dtype)))


# --- median heuristic -----------------------------------------------------------------------


def test_median_heuristic_is_median_of_pooled_distinct_pairs():
    # 1-D points 0, 1, 3 (x) and 6 (y): pair distances^2 = 1, 9, 36, 4, 25, 9 -> median 9.
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[6.0]], dtype=torch.float64)
    assert median_sq_dist(x, y).item() == pytest.approx(9.0)
    # Even count (x alone: 1, 9, 4) -> odd; add a point to get an even count and a mean of two.
    x4 = torch.tensor([[0.0], [1.0], [3.0], [10.0]], dtype=torch.float64)
    pairs = [1, 9, 100, 4, 81, 49]
    assert median_sq_dist(x4).item() == pytest.approx(float(np.median(pairs)))


def test_median_heuristic_is_detached_and_bounded():
    x = _randn(6, 2).requires_grad_(True)
    h = median_sq_dist(x)
    assert not h.requires_grad
    same = torch.zeros(5, 3, dtype=torch.float64)
    assert median_sq_dist(same, same).item() == pytest.approx(1e-6)
    # Most points coincide: the median is 0, so the mean of the pair distances is used.
    pts = torch.tensor([[0.0]] * 5 + [[2.0]], dtype=torch.float64)
    assert median_sq_dist(pts).item() == pytest.approx((5 * 4.0) / 15)


# --- MMD ------------------------------------------------------------------------------------


def test_rbf_kernel_hand_value():
    d2 = torch.tensor([0.0, 2.0], dtype=torch.float64)
    k = rbf_kernel(d2, 1.0, scales=(1.0, 2.0))
    expected = [1.0, 0.5 * (math.exp(-2.0) + math.exp(-1.0))]
    torch.testing.assert_close(k, torch.tensor(expected, dtype=torch.float64))


def test_mmd_hand_computed_one_dimensional():
    # x = {0, 1}, y = {3, 5}, one bandwidth h = 2: k(d2) = exp(-d2 / 2).
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[3.0], [5.0]], dtype=torch.float64)
    h = 2.0
    k = lambda d2: math.exp(-d2 / h)  # noqa: E731  (one scale keeps the hand value short)
    k_xx = k(1.0)
    k_yy = k(4.0)
    k_xy = (k(9.0) + k(25.0) + k(4.0) + k(16.0)) / 4
    expected_u = k_xx + k_yy - 2 * k_xy
    got = mmd2_rbf(x, y, bandwidth=h, scales=(1.0,))
    assert got.item() == pytest.approx(expected_u, rel=1e-12)
    expected_v = (2 + 2 * k_xx) / 4 + (2 + 2 * k_yy) / 4 - 2 * k_xy
    got_v = mmd2_rbf(x, y, bandwidth=h, scales=(1.0,), unbiased=False)
    assert got_v.item() == pytest.approx(expected_v, rel=1e-12)


def test_mmd_of_a_set_with_itself():
    x = _randn(40, 5)
    # V-statistic: exactly zero for the same set.
    assert mmd2_rbf(x, x, unbiased=False).item() == pytest.approx(0.0, abs=1e-12)
    # U-statistic on the very same points is not zero: with K the kernel matrix (diag 1) and
    # S its sum, it equals 2 (S - n) / (n (n - 1)) - 2 S / n^2 < 0. Check that closed form.
    n = x.shape[0]
    h = median_sq_dist(x, x)
    kmat = rbf_kernel(pairwise_sq_dists(x), h, DEFAULT_SCALES)
    s = kmat.sum().item()
    expected = 2 * (s - n) / (n * (n - 1)) - 2 * s / n**2
    assert mmd2_rbf(x, x).item() == pytest.approx(expected, rel=1e-10)
    assert expected < 0


def test_mmd_independent_draws_near_zero_and_grows_with_shift():
    x = _randn(200, 4, seed=3)
    y = _randn(200, 4, seed=4)
    base = mmd2_rbf(x, y).item()
    values = [mmd2_rbf(x, y + shift).item() for shift in (0.25, 0.5, 1.0, 2.0)]
    assert abs(base) < 0.01
    assert all(b > a for a, b in zip([base] + values[:-1], values, strict=True))
    assert values[-1] > 0.2


def test_mmd_is_symmetric_and_differentiable_with_duplicates():
    x = _randn(10, 3, seed=5)
    y = torch.cat([x[:3], x[:3] + 1.0], dim=0).clone().requires_grad_(True)
    value = mmd2_rbf(x, y)
    value.backward()
    assert torch.isfinite(y.grad).all()
    assert mmd2_rbf(y.detach(), x).item() == pytest.approx(value.item(), rel=1e-12)


def test_batched_mmd_is_each_pair_alone():
    # One pair per gene, say: (G, n, d) vs (G, m, d) gives the G values of the pairs taken alone,
    # each with its own median-heuristic bandwidth (also where most points coincide).
    x, y = _randn(5, 12, 3, seed=7), _randn(5, 9, 3, seed=8) + 0.5
    x[2, :10] = 0.0
    y[2, :8] = 0.0
    for unbiased in (True, False):
        batched = mmd2_rbf(x, y, unbiased=unbiased)
        assert batched.shape == (5,)
        alone = torch.stack([mmd2_rbf(x[g], y[g], unbiased=unbiased) for g in range(5)])
        torch.testing.assert_close(batched, alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(median_sq_dist(x, y), torch.stack([median_sq_dist(x[g], y[g]) for g in range(5)]))
    with pytest.raises(ValueError, match="same batch shape"):
        mmd2_rbf(x, y[:4])
    with pytest.raises(ValueError, match="2-D"):
        edistance(x, y)


def test_mmd_needs_two_points_per_side():
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_rbf(torch.zeros(1, 2), torch.zeros(3, 2))


# --- E-distance -----------------------------------------------------------------------------


def test_edistance_identical_sets_is_zero():
    x = _randn(30, 6)
    assert edistance(x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert edistance(x, x[torch.randperm(30)]).item() == pytest.approx(0.0, abs=1e-12)


def test_edistance_hand_values():
    # x = {0}, y = {1}: 2 * 1 - 0 - 0 = 2.
    assert edistance(torch.tensor([[0.0]]), torch.tensor([[1.0]])).item() == pytest.approx(2.0)
    # x = {0, 2}, y = {1}: between = 1, within x = (0 + 2 + 2 + 0) / 4 = 1, within y = 0 -> 1.
    x = torch.tensor([[0.0], [2.0]])
    assert edistance(x, torch.tensor([[1.0]])).item() == pytest.approx(1.0)
    # 2-D: x = {(0,0)}, y = {(3,4)}: 2 * 5 = 10 (Euclidean, not squared).
    assert edistance(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])).item() == pytest.approx(10.0)


def test_edistance_is_scipy_energy_distance_squared_in_1d():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=23), rng.normal(1.0, 2.0, size=17)
    ours = edistance(torch.tensor(u[:, None]), torch.tensor(v[:, None])).item()
    assert ours == pytest.approx(scipy.stats.energy_distance(u, v) ** 2, rel=1e-10)


def test_edistance_gradient_finite_with_coincident_points():
    x = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    y = _randn(5, 3)
    edistance(x, y).backward()
    assert torch.isfinite(x.grad).all()
