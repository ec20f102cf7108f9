"""gessl_ext.inner: the inner update (Eq. 2) and its derivative products, on both problem implementations,
against plain autograd on fresh random float64 inputs."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from gessl_ext import losses
from gessl_ext.hypergrad import FREED
from gessl_ext.inner import proximal_matvec, sgd_update, sgd_update_vjp
from gessl_ext.tasks import EagerTaskProblem, TaskModel, TaskProblem

SIMCLR = losses.SimCLR(temperature=0.5)
ALPHA = 0.07


def task(seed=0, batchnorm=True):
    torch.manual_seed(seed)
    norm = [nn.BatchNorm1d(8)] if batchnorm else []
    model = nn.Sequential(nn.Linear(5, 8), *norm, nn.Tanh(), nn.Linear(8, 4)).double()
    x1, x2 = torch.randn(2, 6, 5, dtype=torch.float64)
    return model, x1, x2


def plain_loss(model, theta, x1, x2):
    """ℓ(θ) by functional_call on the module tree, batch statistics (independent of TaskModel)."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(zip(names, torch.split(theta, [p.numel() for p in model.parameters()])))
    params = {n: t.view_as(p) for (n, t), p in zip(params.items(), model.parameters())}
    z1, z2 = functional_call(model, params, (torch.cat([x1, x2]),)).chunk(2)
    return SIMCLR.pair_loss(z1, z2)


def problems(model, x1, x2, **kwargs):
    task_model = TaskModel(model, SIMCLR)
    consts = task_model.constants()
    return task_model, [cls(task_model, x1, x2, ALPHA, consts, **kwargs) for cls in (TaskProblem, EagerTaskProblem)]


def with_untracked_batchnorm(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    return model


def test_update_is_one_sgd_step_on_the_ssl_loss():
    model, x1, x2 = task()
    task_model, (batched, eager) = problems(model, x1, x2)
    theta = task_model.flat_parameters()
    leaf = theta.clone().requires_grad_()
    grad = torch.autograd.grad(plain_loss(with_untracked_batchnorm(model), leaf, x1, x2), leaf)[0]
    expected = theta - ALPHA * grad
    for problem in (batched, eager):
        assert torch.allclose(problem.update(theta), expected, rtol=0, atol=1e-13)
        iterate = theta.clone()
        assert problem.update_(iterate) is iterate          # in place, parameter by parameter
        assert torch.allclose(iterate, expected, rtol=0, atol=1e-13)
        pieces = problem.grad_pieces(theta)
        shapes = [p.shape for p in task_model.parameters()] if problem is batched else [theta.shape]
        assert [p.shape for p in pieces] == [p.shape for p in problem.pieces(theta)] == shapes
        assert torch.allclose(torch.cat([p.flatten() for p in pieces]), grad, rtol=0, atol=1e-13)
        # a point (per-parameter tensors when batched, the flat θ one at a time) steps and differentiates like θ
        cat = lambda parts: torch.cat([p.flatten() for p in parts])  # noqa: E731
        point = problem.stepped(theta, pieces)
        assert torch.allclose(cat(problem.pieces(point)), expected, rtol=0, atol=1e-13)
        with pytest.raises(ValueError, match="gradient pieces"):   # in other pieces than θ's (e.g. flat, batched)
            problem.stepped(theta, (grad,) if problem is batched else (grad, grad))
        fresh = theta.clone()
        owned = problem.point_from_flat(fresh)     # batched: per-parameter copies; one at a time: the vector itself
        shared = [p.untyped_storage().data_ptr() == fresh.untyped_storage().data_ptr() for p in problem.pieces(owned)]
        assert shared == ([False] * len(shapes) if problem is batched else [True])
        assert torch.allclose(cat(problem.grad_pieces(owned)), grad, rtol=0, atol=1e-13)
        second = cat(problem.grad_pieces(point))
        assert problem.update_(point) is point
        assert torch.allclose(cat(problem.pieces(point)), expected - ALPHA * second, rtol=0, atol=1e-13)
    assert torch.allclose(sgd_update(theta, grad, ALPHA), theta - ALPHA * grad, rtol=0, atol=1e-15)


def test_update_vjp_and_proximal_matvec_are_the_jacobian_products_of_the_update():
    model, x1, x2 = task(1)
    task_model, (batched, eager) = problems(model, x1, x2)
    theta = task_model.flat_parameters()
    u = torch.randn_like(theta)
    plain = with_untracked_batchnorm(model)

    def update(t):
        g = torch.autograd.grad(plain_loss(plain, t, x1, x2), t, create_graph=True)[0]
        return t - ALPHA * g

    leaf = theta.clone().requires_grad_()
    vjp = torch.autograd.grad(update(leaf), leaf, u)[0]        # uᵀ ∂update/∂θ, by double backward
    hu = (u - vjp) / ALPHA
    for problem in (batched, eager):
        assert torch.allclose(problem.update_vjp(theta, u), vjp, rtol=0, atol=1e-11)
        assert torch.allclose(problem.proximal_matvec(theta, u), u + ALPHA * hu, rtol=0, atol=1e-11)
    assert torch.allclose(sgd_update_vjp(u, hu, ALPHA), u - ALPHA * hu, rtol=0, atol=1e-14)
    assert torch.allclose(proximal_matvec(u, hu, ALPHA), u + ALPHA * hu, rtol=0, atol=1e-14)


@pytest.mark.parametrize("steps", [1, 3])
def test_inner_loop_vjp_recorded_or_rerun_equals_reverse_mode_through_the_unrolled_loop(steps):
    model, x1, x2 = task(2)
    task_model, (batched, eager) = problems(model, x1, x2, differentiates_inner_loop=True)
    theta = task_model.flat_parameters()
    cotangent = torch.randn_like(theta)
    plain = with_untracked_batchnorm(model)
    leaf = theta.clone().requires_grad_()
    end = leaf
    for _ in range(steps):
        end = end - ALPHA * torch.autograd.grad(plain_loss(plain, end, x1, x2), end, create_graph=True)[0]
    expected = torch.autograd.grad(end, leaf, cotangent)[0]
    assert eager.recorded_graph and not batched.recorded_graph
    for problem in (batched, eager):
        with problem.recording(theta) as trajectory:
            for _ in range(steps):
                trajectory.append(problem.update(trajectory[-1]))
        trajectory[-1] = FREED     # as the step hands it to itd: the problem keeps what it recorded
        assert torch.allclose(problem.inner_loop_vjp(trajectory, cotangent), expected, rtol=0, atol=1e-11)


def test_the_eager_problem_records_the_loop_only_for_a_method_that_differentiates_it():
    model, x1, x2 = task(3, batchnorm=False)
    _, (_, eager) = problems(model, x1, x2)
    theta = TaskModel(model, SIMCLR).flat_parameters()
    with eager.recording(theta) as trajectory:
        start = trajectory[0]
        end = eager.update(start)
    assert not eager.recorded_graph and not start.requires_grad and end.grad_fn is None
