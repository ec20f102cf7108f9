"""sigma_measure (Definition 3.2): a value computed by hand, the mode it measures in, and a model left as it was."""
import copy
import math

import pytest
import torch
from torch import nn

from gessl_ext import sigma_measure


def test_sigma_equals_the_cross_entropy_computed_by_hand():
    """M = 1, N = 2, identity embeddings: z1 = (1,0), (0,1); z2 = (1,0), (1,1); τ = 0.5."""
    views = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]]], dtype=torch.float64)
    c = 1 / math.sqrt(2)
    tau = 0.5

    def nll(true_logit, other_logit):   # −log softmax of the true class among two
        return -(true_logit - math.log(math.exp(true_logit) + math.exp(other_logit)))

    # view-1 sample i against view-2 samples k: cos(z1_0, ·) = (1, c), cos(z1_1, ·) = (0, c);
    # view-2 sample i against view-1 samples k: cos(z2_0, ·) = (1, 0), cos(z2_1, ·) = (c, c)
    expected = (nll(1 / tau, c / tau) + nll(c / tau, 0 / tau) + nll(1 / tau, 0 / tau) + nll(c / tau, c / tau))
    total, per_sample = sigma_measure(nn.Flatten(), views, head_temperature=tau)
    assert total.dtype == torch.float64
    assert abs(float(total) - expected) < 1e-12
    assert abs(float(per_sample) - expected / 4) < 1e-12


def bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).double()
    with torch.no_grad():   # running statistics far from any batch's, so the two modes give different σ
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(9.0)
    return model


def test_sigma_measures_in_eval_mode_and_leaves_the_model_as_it_was():
    model = bn_model().train()
    model[3].eval()   # a submodule's own flag must come back too
    views = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    sigma, _ = sigma_measure(model, views)
    assert model.training and model[1].training and not model[3].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # running stats and counter untouched
    reference = copy.deepcopy(model).eval()
    expected, _ = sigma_measure(reference, views)
    assert torch.equal(sigma, expected)
    with torch.no_grad():   # the train-mode (batch-statistics) value differs, so the mode really is eval
        train_mode = copy.deepcopy(model)
        batch_sigma = sum(-torch.log_softmax(_pair_logits(*train_mode(torch.cat([t[0], t[1]])).chunk(2)), -1)
                          .gather(1, torch.arange(5).repeat(2)[:, None]).sum() for t in views)
    assert abs(float(batch_sigma) - float(sigma)) > 1e-3


def _pair_logits(a, b, tau=0.1):
    a, b = nn.functional.normalize(a, dim=-1), nn.functional.normalize(b, dim=-1)
    return torch.cat([a @ b.T, b @ a.T]) / tau


@pytest.mark.parametrize("views", [torch.zeros(2, 3, 4, 6), torch.zeros(2, 2, 1, 6), torch.zeros(2, 2, 6), [1, 2]])
def test_bad_views_are_a_value_error_naming_the_shape(views):
    with pytest.raises(ValueError, match=r"views must have shape \[M, 2, N>=2"):
        sigma_measure(nn.Flatten(), views)


def test_views_of_another_dtype_than_the_model_are_a_type_error_naming_the_fix():
    with pytest.raises(TypeError, match=r"views are torch.float64 .* convert the views"):
        sigma_measure(nn.Linear(6, 4), torch.zeros(1, 2, 3, 6, dtype=torch.float64))
