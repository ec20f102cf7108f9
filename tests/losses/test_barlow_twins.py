import math

import pytest
import torch

from gessl_ext.losses import BarlowTwins


def barlow_twins_loop(z1, z2, lambd, eps):
    """Plain-Python Barlow Twins with biased batch variance + eps under the square root."""
    n, d = z1.shape

    def standardise(z):
        columns = []
        for j in range(d):
            values = [float(z[i, j]) for i in range(n)]
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / n + eps)
            columns.append([(v - mean) / std for v in values])
        return columns  # [d][n]

    a, b = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def test_two_sample_closed_form():
    # N = 2: every standardised column is +-[-s, s] with s^2 = r^2 / (r^2 + eps), r = half the spread (here 1).
    # z1 columns [0, 2] and [1, -1]; z2 columns [0, 2] and [0, 2]
    # -> C = [[s^2, s^2], [-s^2, -s^2]]; loss = (1 - s^2)^2 + (1 + s^2)^2 + lambd * 2 s^4.
    lambd, eps = 0.0051, 1e-3
    z1 = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    s2 = 1 / (1 + eps)
    expected = (1 - s2) ** 2 + (1 + s2) ** 2 + lambd * 2 * s2**2
    assert BarlowTwins(lambd, eps).pair_loss(z1, z2).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, d, lambd", [(6, 4, 0.0051), (2, 3, 0.5), (9, 2, 0.0)])
def test_matches_loop_reference(n, d, lambd):
    generator = torch.Generator().manual_seed(n * 10 + d)
    z1, z2 = (torch.randn(2, n, d, dtype=torch.float64, generator=generator) * 3 + 1).unbind()
    loss = BarlowTwins(lambd, eps=1e-5).pair_loss(z1, z2)
    assert loss.item() == pytest.approx(barlow_twins_loop(z1, z2, lambd, 1e-5), rel=1e-10)


def test_constant_dimension_is_finite_with_finite_gradient():
    z1 = torch.tensor([[1.0, 0.3], [1.0, -0.7], [1.0, 0.1]], dtype=torch.float64, requires_grad=True)
    z2 = torch.tensor([[0.2, 0.3], [0.4, 0.1], [0.9, 0.5]], dtype=torch.float64)
    loss = BarlowTwins().pair_loss(z1, z2)
    loss.backward()
    assert loss.item() == pytest.approx(barlow_twins_loop(z1.detach(), z2, 0.0051, 1e-5), rel=1e-10)
    assert torch.isfinite(z1.grad).all()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lambd"):
        BarlowTwins(lambd=-1.0)
    with pytest.raises(ValueError, match="eps"):
        BarlowTwins(eps=0.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        BarlowTwins().pair_loss(torch.zeros(1, 3), torch.zeros(1, 3))
