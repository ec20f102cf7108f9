"""The HYPERGRADIENTS registry: one signature, custom strategies, and loop / vmap task batching agreeing."""
import inspect

import pytest
import torch

from gessl_ext import HYPERGRADIENTS, GeSSLStep, losses, register_hypergradient
from gessl_ext.hypergrad import first_order
from hypergrad_test_utils import rel_err, smooth_mlp, step_hypergradient

SIMCLR = losses.SimCLR(temperature=0.5)
BUILT_INS = ("itd", "fd", "hvp", "first_order", "neumann", "cg")
STEP = dict(inner_lr=0.05, inner_steps=2, target_steps=2, head_temperature=0.1, implicit_iters=3)


def test_every_registered_method_has_the_strategy_signature():
    assert set(BUILT_INS) <= set(HYPERGRADIENTS)
    for name, method in HYPERGRADIENTS.items():
        parameters = list(inspect.signature(method).parameters.values())
        assert [p.name for p in parameters] == ["problem", "trajectory", "outer_grad", "config"], name
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
                   for p in parameters), name


@pytest.mark.parametrize("not_callable", [None, 3, "fd"])
def test_register_rejects_non_callables(not_callable):
    with pytest.raises(TypeError, match="callable"):
        register_hypergradient("broken", not_callable)
    assert "broken" not in HYPERGRADIENTS


def test_unknown_method_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError, match="hvp"):
        GeSSLStep(smooth_mlp(), SIMCLR, hypergrad="hessian")


def test_a_registered_method_is_used_by_the_step():
    def doubled_first_order(problem, trajectory, outer_grad, config):
        return 2 * first_order(problem, trajectory, outer_grad, config)

    register_hypergradient("doubled_first_order", doubled_first_order)
    try:
        model = smooth_mlp()
        views = torch.randn(2, 2, 5, 6, dtype=torch.float64)
        plain, _ = step_hypergradient(model, views, SIMCLR, hypergrad="first_order", **STEP)
        doubled, _ = step_hypergradient(model, views, SIMCLR, hypergrad="doubled_first_order", **STEP)
    finally:
        del HYPERGRADIENTS["doubled_first_order"]
    assert torch.allclose(doubled, 2 * plain, rtol=1e-14, atol=0)


@pytest.mark.parametrize("method", BUILT_INS)
def test_loop_and_vmap_task_batching_give_the_same_hypergradient(method):
    model = smooth_mlp(batchnorm=True)
    views = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    looped, looped_out = step_hypergradient(model, views, SIMCLR, hypergrad=method, task_batching="loop", **STEP)
    batched, batched_out = step_hypergradient(model, views, SIMCLR, hypergrad=method, task_batching="vmap", **STEP)
    assert rel_err(batched, looped) < 1e-12
    assert rel_err(batched_out.kl, looped_out.kl) < 1e-12


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("method", BUILT_INS)
def test_written_grads_carry_no_autograd_graph(method, batching):
    """.grad must be a plain tensor, as after backward(): a graph attached to it would keep every activation
    of the step alive until the next zero_grad."""
    model = smooth_mlp(batchnorm=True)
    GeSSLStep(model, SIMCLR, hypergrad=method, task_batching=batching, **STEP)(
        torch.randn(2, 2, 5, 6, dtype=torch.float64))
    assert not any(p.grad.requires_grad or p.grad.grad_fn is not None for p in model.parameters())
