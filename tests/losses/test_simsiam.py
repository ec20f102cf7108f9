import pytest
import torch

from gessl_ext.losses import SimSiam
from loss_test_utils import cosine, reference_prediction_mlp


def simsiam_reference(predictor, z1, z2, t1, t2):
    """-1/2 mean cos(p1, t2) - 1/2 mean cos(p2, t1) with explicit constant targets t1, t2."""
    p1, p2 = reference_prediction_mlp(predictor, torch.cat([z1, z2])).chunk(2)
    n = len(z1)
    cos = torch.nn.functional.cosine_similarity
    return -0.5 * (cos(p1, t2, dim=1).sum() + cos(p2, t1, dim=1).sum()) / n


def make_objective(seed=0):
    torch.manual_seed(seed)
    objective = SimSiam(embed_dim=3, hidden_dim=5).double()
    with torch.no_grad():
        objective.predictor[1].weight.uniform_(0.5, 1.5)
        objective.predictor[1].bias.uniform_(-0.5, 0.5)
    return objective


def test_value_matches_loop_reference():
    objective = make_objective()
    z1, z2 = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).unbind()
    p1, p2 = reference_prediction_mlp(objective.predictor, torch.cat([z1, z2])).chunk(2)
    expected = -0.5 * (sum(cosine(p1[i], z2[i]) for i in range(6)) + sum(cosine(p2[i], z1[i]) for i in range(6))) / 6
    assert objective.pair_loss(z1, z2).item() == pytest.approx(expected, rel=1e-10)


def test_constant_predictor_closed_form():
    # first layer zero -> BN output = its bias 0 -> ReLU 0 -> p = last bias c = (1, 0) for every row.
    # cos(c, z2) = [1/sqrt2, -1], cos(c, z1) = [1, 0] -> loss = -1/2 ((1/sqrt2 - 1)/2 + 1/2) = -1/(4 sqrt2);
    # with stop-gradient and a constant prediction, the gradient w.r.t. the embeddings is exactly zero.
    objective = SimSiam(embed_dim=2, hidden_dim=3).double()
    with torch.no_grad():
        objective.predictor[0].weight.zero_()
        objective.predictor[1].bias.zero_()
        objective.predictor[3].bias.copy_(torch.tensor([1.0, 0.0]))
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    z2 = torch.tensor([[1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = objective.pair_loss(z1, z2)
    assert loss.item() == pytest.approx(-1 / (4 * 2**0.5), rel=1e-12)
    grad_z1, grad_z2 = torch.autograd.grad(loss, [z1, z2])
    assert torch.equal(grad_z1, torch.zeros_like(z1)) and torch.equal(grad_z2, torch.zeros_like(z2))


def test_gradient_treats_targets_as_constants():
    objective = make_objective(seed=2)
    z = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z1, z2 = z.clone().requires_grad_().unbind()
    params = list(objective.parameters())
    grads = torch.autograd.grad(objective.pair_loss(z1, z2), [z1, z2, *params])
    r1, r2 = z.clone().requires_grad_().unbind()
    reference = simsiam_reference(objective.predictor, r1, r2, z[0], z[1])
    expected = torch.autograd.grad(reference, [r1, r2, *params])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="embed_dim"):
        SimSiam(embed_dim=0)
    with pytest.raises(ValueError, match="hidden_dim"):
        SimSiam(embed_dim=4, hidden_dim=2.5)
