"""fd: the backward recursion through the K inner steps with central finite-difference HVPs."""
import pytest
import torch

from gessl_ext import losses
from gessl_ext.hypergrad import FD
from hypergrad_test_utils import (QuadraticProblem, check_quadratic_strategy, random_spd, rel_err, smooth_mlp,
                                  step_hypergradient)

SIMCLR = losses.SimCLR(temperature=0.5)
STEP = dict(inner_lr=0.05, target_steps=3, head_temperature=0.1)


@pytest.mark.parametrize("radius", [0.5, 1e-3])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_quadratic_fd_is_exact_for_any_radius(inner_steps, radius):
    """A quadratic has a linear gradient, so the central difference has no truncation error at all."""

    def expected(matrix, v):
        return torch.linalg.matrix_power(torch.eye(len(v), dtype=v.dtype) - 0.1 * matrix, inner_steps) @ v

    check_quadratic_strategy(FD(radius=radius), 0.1, inner_steps, expected, tol=1e-10)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_finite_difference_of_a_zero_direction_is_zero_not_nan(use_kernels):
    generator = torch.Generator().manual_seed(0)
    problem = QuadraticProblem(random_spd(4, generator), torch.ones(4, dtype=torch.float64), 0.1, use_kernels)
    theta = torch.ones(4, dtype=torch.float64)
    result = FD(radius=0.01).step_back(problem, theta, torch.zeros(4, dtype=torch.float64))
    # ε = r / tiny makes both folds' weight 1/2ε ≈ 1e-306: what is left is the subnormal rounding of their sum
    assert torch.isfinite(result).all() and result.abs().max() < 1e-300


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_fd_matches_itd_on_a_smooth_net(inner_steps):
    """r = 1e-3 keeps the O(r²) bias near 1e-5 here (at the default r = 0.01 it is 3e-4 for K = 1, 9e-4 for K = 3)."""
    model = smooth_mlp()
    views = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    exact, _ = step_hypergradient(model, views, SIMCLR, hypergrad="itd", inner_steps=inner_steps, **STEP)
    approx, _ = step_hypergradient(model, views, SIMCLR, hypergrad=FD(radius=1e-3), inner_steps=inner_steps,
                                   **STEP)
    assert rel_err(approx, exact) < 1e-3


def test_fd_error_falls_as_radius_squared_on_a_smooth_net():
    """Central differences have an O(r²) truncation error when ∇ℓ is smooth: ×100 less per decade of r."""
    model = smooth_mlp()
    views = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    exact, _ = step_hypergradient(model, views, SIMCLR, hypergrad="itd", inner_steps=2, **STEP)
    errors = [rel_err(step_hypergradient(model, views, SIMCLR, hypergrad=FD(radius=r), inner_steps=2, **STEP)[0],
                      exact) for r in (1e-2, 1e-3, 1e-4)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(100 / 1.5 < ratio < 100 * 1.5 for ratio in ratios), (errors, ratios)
