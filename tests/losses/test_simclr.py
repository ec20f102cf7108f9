import math

import pytest
import torch

from gessl_ext.losses import SimCLR
from loss_test_utils import cosine


def nt_xent_loop(z1, z2, temperature):
    """Plain-Python NT-Xent: anchors are all 2N embeddings, positive = other view of the same sample."""
    rows = list(z1) + list(z2)
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        logits = {k: cosine(rows[a], rows[k]) / temperature for k in range(2 * n) if k != a}
        total += -logits[positive] + math.log(sum(math.exp(v) for v in logits.values()))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.5, 0.2])
def test_orthogonal_pairs_closed_form(temperature):
    # Directions e1, e2 in both views (scaled, since the loss is on cosines): every anchor has
    # cos 1 with its positive and cos 0 with both negatives -> log(1 + 2 exp(-1/t)).
    z1 = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.5, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = math.log(1 + 2 * math.exp(-1 / temperature))
    assert SimCLR(temperature).pair_loss(z1, z2).item() == pytest.approx(expected, rel=1e-12)


def test_rotated_pairs_closed_form():
    # view 1: e1, e2; view 2: (e1 + e2)/sqrt2, (e1 - e2)/sqrt2; c = 1/sqrt2.
    # anchors z1_0 and z2_0: positive c, negatives {c, 0} -> log(2 + exp(-c/t))
    # anchors z1_1 and z2_1: positive -c, negatives {c, 0} -> c/t + log(1 + exp(c/t) + exp(-c/t))
    t, c = 0.5, 1 / math.sqrt(2)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    expected = (math.log(2 + math.exp(-c / t)) + c / t + math.log(1 + math.exp(c / t) + math.exp(-c / t))) / 2
    assert SimCLR(t).pair_loss(z1, z2).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, d, temperature", [(5, 4, 0.5), (3, 7, 0.1), (1, 3, 1.0)])
def test_matches_loop_reference(n, d, temperature):
    generator = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(2, n, d, dtype=torch.float64, generator=generator).unbind()
    loss = SimCLR(temperature).pair_loss(z1, z2)
    assert loss.item() == pytest.approx(nt_xent_loop(z1, z2, temperature), rel=1e-10, abs=1e-12)


def test_gradient_is_finite_with_masked_self_similarities():
    z = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    SimCLR(0.5).pair_loss(z[0], z[1]).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        SimCLR(temperature)


def test_rejects_mismatched_embeddings():
    with pytest.raises(ValueError, match=r"\(3, 2\) and \(3, 4\)"):
        SimCLR().pair_loss(torch.zeros(3, 2), torch.zeros(3, 4))
