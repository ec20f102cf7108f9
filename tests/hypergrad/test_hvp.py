"""hvp: the backward recursion of ``fd`` with exact Hessian-vector products."""
import pytest
import torch
from torch import nn
from torch.func import jvp, vjp

from gessl_ext import GeSSLStep, losses
from gessl_ext.hypergrad import HVP
from gessl_ext.tasks import TaskProblem
from hypergrad_test_utils import (check_quadratic_strategy, flat_ssl_hessian, flatten, rel_err, smooth_mlp,
                                  step_hypergradient, unrolled_reference)

SIMCLR = losses.SimCLR(temperature=0.5)
STEP = dict(inner_lr=0.05, target_steps=3, head_temperature=0.1)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_quadratic_hvp_is_the_product_of_step_jacobians(inner_steps):
    def expected(matrix, v):
        return torch.linalg.matrix_power(torch.eye(len(v), dtype=v.dtype) - 0.1 * matrix, inner_steps) @ v

    check_quadratic_strategy(HVP(), 0.1, inner_steps, expected, tol=1e-13)


def tiny_relu_maxpool_convnet():
    """conv(1→2) → ReLU → conv(2→3) → ReLU → 2×2 max-pool → linear(3→3) for 6×6 inputs: P = 89."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3, 3)).double()


@pytest.mark.parametrize("make_model, input_shape", [
    (lambda: smooth_mlp(in_dim=4, hidden=5, out_dim=3, batchnorm=True), (4,)),
    (tiny_relu_maxpool_convnet, (1, 6, 6)),
], ids=["tanh-silu-batchnorm", "relu-maxpool"])
def test_task_problem_hvp_equals_the_dense_hessian_product(make_model, input_shape):
    model = make_model()
    task_model = GeSSLStep(model, SIMCLR, hypergrad="hvp").task_model
    x1, x2 = torch.randn(2, 6, *input_shape, dtype=torch.float64)
    problem = TaskProblem(task_model, x1, x2, 0.05, task_model.constants())
    theta = flatten([p.detach() for p in model.parameters()])
    directions = torch.randn(3, theta.numel(), dtype=torch.float64)
    dense = flat_ssl_hessian(model, SIMCLR, theta, x1, x2)
    for v in directions:
        assert rel_err(problem.hvp(theta, v), dense @ v) < 1e-10
        # both ways of computing it exactly agree: forward-over-reverse and double backward
        assert rel_err(jvp(problem.grad, (theta,), (v,))[1], dense @ v) < 1e-10
        # (.detach(): through train-mode BatchNorm torch 2.14's vjp of a grad returns a tensor with a graph attached)
        assert rel_err(vjp(problem.grad, theta)[1](v)[0].detach(), dense @ v) < 1e-10


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_step_hvp_equals_itd_and_the_unrolled_reference_on_a_smooth_net(inner_steps):
    model = smooth_mlp()
    views = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    reference = unrolled_reference(model, SIMCLR.pair_loss, views, STEP["inner_lr"], inner_steps, STEP["target_steps"],
                                   STEP["head_temperature"])
    exact, _ = step_hypergradient(model, views, SIMCLR, hypergrad="hvp", inner_steps=inner_steps, **STEP)
    unrolled, _ = step_hypergradient(model, views, SIMCLR, hypergrad="itd", inner_steps=inner_steps, **STEP)
    assert rel_err(exact, reference["exact"]) < 1e-8
    assert rel_err(exact, unrolled) < 1e-10
