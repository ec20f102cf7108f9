"""gessl_ext.tasks: the flat-parameter task model, its two problem implementations, the task mapping and
the running-statistics rule, each against a plain computation on fresh random float64 inputs."""
import copy

import pytest
import torch
from torch import nn

from gessl_ext import losses
from gessl_ext.tasks import (EagerTaskProblem, FlatParams, TaskModel, TaskProblem, fold_running_stats,
                             per_task_copies, run_tasks)

SIMCLR = losses.SimCLR(temperature=0.5)


def bn_model(momentum=0.1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Tanh(), nn.Linear(8, 4)).double()


def test_flat_params_round_trip_as_views():
    spec = FlatParams({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1, 1, 2)})
    flat = torch.arange(12.0)
    parts = spec.unflatten(flat)
    assert [tuple(t.shape) for t in parts.values()] == [(2, 3), (4,), (1, 1, 2)]
    assert torch.equal(spec.flatten(parts.values()), flat)
    parts["b"][0] = -1.0            # views: writing through one changes the flat vector
    assert flat[6] == -1.0


@pytest.mark.parametrize("differentiates_inner_loop", [False, True])
def test_functional_and_eager_problems_give_the_same_derivatives(differentiates_inner_loop):
    """With ``differentiates_inner_loop`` the functional problem's BatchNorm is gessl_ext.batch_norm.normalize, which
    has no forward-mode rule: ``hvp`` must still work (on torch's kernels), and the loop's vjp must match."""
    model = bn_model()
    task_model = TaskModel(model, SIMCLR)
    x1, x2 = torch.randn(2, 6, 5, dtype=torch.float64)
    theta = task_model.flat_parameters()
    v = torch.randn_like(theta)
    batched = TaskProblem(task_model, x1, x2, 0.05, task_model.constants(),
                          differentiates_inner_loop=differentiates_inner_loop)
    eager = EagerTaskProblem(task_model, x1, x2, 0.05, task_model.constants())
    assert torch.allclose(batched.grad(theta), eager.grad(theta), rtol=0, atol=1e-13)
    assert torch.allclose(batched.hvp(theta, v), eager.hvp(theta, v), rtol=0, atol=1e-11)
    trajectory = [theta, batched.unroll(theta, 2)]
    assert torch.allclose(batched.inner_loop_vjp(trajectory, v), eager.inner_loop_vjp(trajectory, v), rtol=0, atol=1e-11)
    for a, b in zip(batched.embed(theta), eager.embed(theta)):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("batching, chunk", [("loop", None), ("vmap", None), ("vmap", 2)])
def test_run_tasks_maps_every_task_and_sums_the_first_output(batching, chunk):
    theta = torch.randn(4, dtype=torch.float64)
    views = torch.randn(5, 2, 3, 4, dtype=torch.float64)
    stats = {"s": torch.randn(5, 4, dtype=torch.float64)}

    def task_fn(theta, task_views, task_stats):
        value = theta * task_views.sum((0, 1))
        return value, (value.sum(), task_stats["s"] + 1)

    total, (sums, shifted) = run_tasks(task_fn, theta, views, stats, batching, chunk)
    expected = theta * views.sum((1, 2))
    assert torch.allclose(total, expected.sum(0), rtol=0, atol=1e-13)
    assert torch.allclose(sums, expected.sum(1), rtol=0, atol=1e-13)
    assert torch.equal(shifted, stats["s"] + 1)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_folded_running_stats_equal_m_ordinary_training_forwards(momentum):
    """Each task's copy took one update from r0; folding must replay the M updates in task order."""
    model = bn_model(momentum)
    with torch.no_grad():
        model(torch.randn(7, 5, dtype=torch.float64))            # a non-trivial starting point (and counter 1)
    batches = torch.randn(3, 6, 5, dtype=torch.float64)
    sequential = copy.deepcopy(model)
    with torch.no_grad():
        for batch in batches:
            sequential(batch)
    task_model = TaskModel(model, SIMCLR)
    per_task = per_task_copies(task_model.running_stats(), len(batches))
    for index, batch in enumerate(batches):                       # each task's copy: one update from r0
        single = copy.deepcopy(model)
        with torch.no_grad():
            single(batch)
        for name in per_task:
            per_task[name][index] = dict(single.named_buffers())[name.removeprefix("model.")]
    fold_running_stats(task_model, per_task)
    for name, buffer in sequential.named_buffers():
        assert torch.allclose(dict(model.named_buffers())[name], buffer, rtol=0, atol=1e-13), name
