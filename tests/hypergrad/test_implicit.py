"""neumann and cg: the implicit (proximal) hypergradient u = (I + αH(θᴷ))⁻¹ v."""
import pytest
import torch

from gessl_ext import losses
from gessl_ext.hypergrad import CG, Neumann
from hypergrad_test_utils import (check_quadratic_strategy, flat_ssl_hessian, quadratic_results, rel_err, smooth_mlp,
                                  step_hypergradient, unrolled_reference)

SIMCLR = losses.SimCLR(temperature=0.5)
INNER_LR = 0.1


def truncated_neumann(matrix, v, terms, inner_lr=INNER_LR):
    """Σ_{j=0}^{terms} (−αA)ʲ v."""
    total, term = v, v
    for _ in range(terms):
        term = -inner_lr * (matrix @ term)
        total = total + term
    return total


def proximal_solve(matrix, v, inner_lr=INNER_LR):
    """(I + αA)⁻¹ v by a dense solve."""
    return torch.linalg.solve(torch.eye(len(v), dtype=v.dtype) + inner_lr * matrix, v)


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("terms", [1, 5])
def test_quadratic_neumann_is_the_truncated_series(terms, inner_steps):
    check_quadratic_strategy(Neumann(iters=terms), INNER_LR, inner_steps, lambda a, v: truncated_neumann(a, v, terms),
                             tol=1e-13)


def test_quadratic_neumann_converges_to_the_proximal_solution():
    # ‖αA‖ ≤ 0.45, so 80 terms leave a remainder below 0.45⁸⁰ ≈ 1e-28
    check_quadratic_strategy(Neumann(iters=80), INNER_LR, 1, proximal_solve, tol=1e-12)


@pytest.mark.parametrize("iters", [6, 10])
def test_quadratic_cg_solves_the_proximal_system_once_iters_reach_the_dimension(iters):
    check_quadratic_strategy(CG(iters=iters), INNER_LR, 2, proximal_solve, tol=1e-10, dim=6)


def test_quadratic_cg_with_fewer_iterations_than_the_dimension_is_not_yet_the_solution():
    looped, batched, expected = quadratic_results(CG(iters=2), INNER_LR, 1, proximal_solve, dim=6)
    assert rel_err(looped, expected) > 1e-4 and rel_err(batched, expected) > 1e-4


@pytest.mark.parametrize("method", [Neumann, CG])
def test_step_implicit_methods_equal_dense_hessian_formulas(method):
    """On a small smooth net: neumann = Σ_{j≤J}(−αH)ʲv and cg (J = P iterations) = (I + αH)⁻¹v per task,
    with H the dense Hessian of the SSL loss at the adapted weights θᴷ from an independent reference."""
    model = smooth_mlp(in_dim=4, hidden=5, out_dim=3)
    num_params = sum(p.numel() for p in model.parameters())
    views = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    iters = 4 if method is Neumann else num_params
    reference = unrolled_reference(model, SIMCLR.pair_loss, views, INNER_LR, 2, 2, 0.1)
    expected = torch.zeros(num_params, dtype=torch.float64)
    for (x1, x2), theta_k, outer_grad in zip(views, reference["theta_k"], reference["outer_grad"]):
        h = flat_ssl_hessian(model, SIMCLR, theta_k, x1, x2)
        assert torch.linalg.eigvalsh(torch.eye(num_params, dtype=h.dtype) + INNER_LR * h).min() > 0.1
        if method is Neumann:
            expected += truncated_neumann(h, outer_grad, iters)
        else:
            expected += proximal_solve(h, outer_grad)
    expected /= len(views)
    hypergrad, _ = step_hypergradient(model, views, SIMCLR, inner_lr=INNER_LR, inner_steps=2, target_steps=2,
                                      head_temperature=0.1, hypergrad=method(iters=iters))
    assert rel_err(hypergrad, expected) < 1e-8
