"""itd: exact reverse-mode differentiation through the unrolled inner loop."""
import pytest
import torch

from gessl_ext import losses
from gessl_ext.hypergrad import ITD
from hypergrad_test_utils import check_quadratic_strategy, rel_err, smooth_mlp, step_hypergradient, unrolled_reference

SIMCLR = losses.SimCLR(temperature=0.5)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_quadratic_itd_is_the_product_of_step_jacobians(inner_steps):
    def expected(matrix, v):
        return torch.linalg.matrix_power(torch.eye(len(v), dtype=v.dtype) - 0.1 * matrix, inner_steps) @ v

    check_quadratic_strategy(ITD(), 0.1, inner_steps, expected, tol=1e-13)


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_step_itd_equals_an_unrolled_autograd_reference(inner_steps, batchnorm):
    model = smooth_mlp(batchnorm=batchnorm)
    views = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    reference = unrolled_reference(model, SIMCLR.pair_loss, views, 0.05, inner_steps, 3, 0.1)
    hypergrad, out = step_hypergradient(model, views, SIMCLR, inner_lr=0.05, inner_steps=inner_steps, target_steps=3,
                                        head_temperature=0.1, hypergrad="itd")
    assert rel_err(hypergrad, reference["exact"]) < 1e-8
    assert rel_err(out.kl, reference["kl"]) < 1e-10
    assert abs(float(out.loss) - float(reference["kl"].mean())) < 1e-12
