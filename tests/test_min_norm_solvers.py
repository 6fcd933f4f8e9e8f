"""MGDA min-norm solver (weighting/min_norm_solvers.py) against an exact brute-force reference."""
import itertools

import numpy as np
import pytest
import torch

from weighting.min_norm_solvers import NORMALIZATIONS, find_min_norm_element, gradient_normalizers

torch.set_num_threads(1)


def reference_min_norm(G):
    """min ||alpha @ G||^2 over the simplex by enumerating supports S: the minimiser on the affine hull of
    {g_s}_{s in S} solves the KKT system [[M_SS, 1], [1^T, 0]] [a; mu] = [0; 1] (least squares if singular).
    Every support whose solution is >= 0 gives a feasible cost, and the support of an optimum with affinely
    independent g's (Caratheodory) gives the minimum."""
    G = np.asarray(G, dtype=np.float64)
    M, T = G @ G.T, G.shape[0]
    best = np.inf
    for size in range(1, T + 1):
        for S in map(list, itertools.combinations(range(T), size)):
            kkt = np.ones((size + 1, size + 1))
            kkt[:size, :size], kkt[size, size] = M[np.ix_(S, S)], 0.0
            a = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if a.min() >= -1e-9:
                alpha = np.zeros(T)
                alpha[S] = np.clip(a, 0, None) / np.clip(a, 0, None).sum()
                best = min(best, alpha @ M @ alpha)
    return best


def solve_and_check(G):
    """Runs the solver and checks the invariants: simplex, finite, cost = ||alpha @ G||^2."""
    alpha, cost = find_min_norm_element(G)
    assert alpha.shape == (G.shape[0],) and alpha.dtype == G.dtype and alpha.device == G.device
    assert torch.isfinite(alpha).all() and np.isfinite(cost)
    assert (alpha >= 0).all() and float(alpha.sum()) == pytest.approx(1.0, abs=1e-6)
    a, g = alpha.double(), G.double()
    assert float((a @ g).pow(2).sum()) == pytest.approx(float(cost), rel=1e-6, abs=1e-9)
    return alpha, float(cost)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("D", [2, 3, 7, 20])
@pytest.mark.parametrize("T", range(1, 11))
def test_matches_brute_force_on_random_problems(T, D, seed):
    gen = torch.Generator().manual_seed(1000 * T + 10 * D + seed)
    G = torch.randn(T, D, generator=gen, dtype=torch.float64)
    if seed == 1:  # a shared component puts the minimum inside the hull (many active tasks)
        G = G + 2.0 * torch.randn(D, generator=gen, dtype=torch.float64)
    if seed == 2:  # badly scaled features (ill-conditioned Gram matrix)
        G = G * torch.logspace(-3, 0, D, dtype=torch.float64)
    _, cost = solve_and_check(G)
    ref = reference_min_norm(G.numpy())
    assert abs(cost - ref) <= 1e-6 * max(1.0, ref)


def test_float32_input_and_scale_invariance():
    G = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    alpha, cost = solve_and_check(G)
    assert cost == pytest.approx(reference_min_norm(G.numpy()), rel=1e-5, abs=1e-6)
    for scale in (1e-6, 1e6):  # MGDA-UB gradients w.r.t. z are O(1e-4): the answer must not depend on scale
        alpha_scaled, cost_scaled = solve_and_check(G * scale)
        assert torch.allclose(alpha_scaled, alpha, atol=1e-5)
        assert cost_scaled == pytest.approx(cost * scale**2, rel=1e-4)


def test_single_task():
    alpha, cost = solve_and_check(torch.tensor([[3.0, 4.0]]))
    assert alpha.tolist() == [1.0] and cost == pytest.approx(25.0)
    alpha, cost = solve_and_check(torch.zeros(1, 5))
    assert alpha.tolist() == [1.0] and cost == 0.0


@pytest.mark.parametrize("T", [2, 3, 5])
def test_all_zero_gradients(T):
    _, cost = solve_and_check(torch.zeros(T, 4))
    assert cost == 0.0


@pytest.mark.parametrize("T", [2, 3, 6])
def test_one_zero_row_is_the_optimum(T):
    G = torch.randn(T, 5, generator=torch.Generator().manual_seed(T))
    G[T // 2] = 0.0
    alpha, cost = solve_and_check(G)
    assert alpha[T // 2] == pytest.approx(1.0) and cost == pytest.approx(0.0, abs=1e-12)


def test_duplicate_rows():
    g = torch.tensor([1.0, -2.0, 0.5])
    _, cost = solve_and_check(torch.stack([g, g, g]))
    assert cost == pytest.approx(float(g @ g))
    G = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, cost = solve_and_check(torch.cat([G, G, G[:1]]))
    assert cost == pytest.approx(reference_min_norm(G.numpy()), abs=1e-12)


def test_colinear_gradients():
    g = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    alpha, cost = solve_and_check(torch.stack([g, -2.0 * g]))  # opposite: 0 = (2/3) g + (1/3)(-2g)
    assert torch.allclose(alpha, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)) and cost == pytest.approx(0.0)
    h = torch.tensor([0.3, 0.1, 5.0], dtype=torch.float64)
    _, cost = solve_and_check(torch.stack([h, g, -2.0 * g]))
    assert cost == pytest.approx(0.0, abs=1e-12)
    alpha, cost = solve_and_check(torch.stack([g, 2.0 * g]))  # same direction: the shorter one, exactly
    assert alpha.tolist() == [1.0, 0.0] and cost == pytest.approx(float(g @ g))


def test_iteration_cap_still_returns_a_feasible_point():
    G = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alpha, cost = find_min_norm_element(G, max_iter=1)
    assert torch.isfinite(alpha).all() and (alpha >= 0).all() and float(alpha.sum()) == pytest.approx(1.0)
    assert cost >= reference_min_norm(G.numpy()) - 1e-12


def test_gradient_normalizers():
    grads = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    losses = torch.tensor([2.0, 0.0, 0.5])
    expected = {
        "none": [1.0, 1.0, 1.0],
        "l2": [5.0, 1.0, 1.0],  # zero gradient: normaliser 1, not 0
        "loss": [2.0, 1.0, 0.5],  # zero loss: normaliser 1
        "loss+": [10.0, 1.0, 0.5],
    }
    assert set(expected) == set(NORMALIZATIONS)
    for kind, values in expected.items():
        assert gradient_normalizers(grads, losses, kind).tolist() == pytest.approx(values)
    doubled = {"none": [1.0, 1.0, 1.0], "l2": [10.0, 1.0, 2.0], "loss": [2.0, 1.0, 0.5], "loss+": [20.0, 1.0, 1.0]}
    for kind, values in doubled.items():  # R runs at once ([R, T, D], [R, T]; stacked MGDA): each run's own
        runs = gradient_normalizers(torch.stack([grads, 2 * grads]), torch.stack([losses, losses]), kind)
        assert runs.tolist() == [pytest.approx(expected[kind]), pytest.approx(values)]
    with pytest.raises(ValueError, match="none, l2, loss, loss\\+"):
        gradient_normalizers(grads, losses, "L2")
