"""first_order: dθᴷ/dθ taken as the identity, so dL/dθ ≈ ∂L/∂θᴷ."""
import pytest
import torch

from gessl_ext import losses
from gessl_ext.hypergrad import FirstOrder
from hypergrad_test_utils import check_quadratic_strategy, rel_err, smooth_mlp, step_hypergradient, unrolled_reference

SIMCLR = losses.SimCLR(temperature=0.5)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_quadratic_first_order_returns_the_outer_gradient(inner_steps):
    check_quadratic_strategy(FirstOrder(), 0.1, inner_steps, lambda matrix, v: v, tol=0.0)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_step_first_order_is_the_mean_outer_gradient_at_the_adapted_weights(inner_steps):
    model = smooth_mlp(batchnorm=True)
    views = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    reference = unrolled_reference(model, SIMCLR.pair_loss, views, 0.05, inner_steps, 2, 0.1)
    hypergrad, out = step_hypergradient(model, views, SIMCLR, inner_lr=0.05, inner_steps=inner_steps, target_steps=2,
                                        head_temperature=0.1, hypergrad="first_order")
    assert rel_err(hypergrad, reference["first_order"]) < 1e-8
    assert rel_err(out.kl, reference["kl"]) < 1e-10
    # the dropped second-order term is not negligible here, so this test can tell first_order from the exact one
    assert rel_err(hypergrad, reference["exact"]) > 1e-3
