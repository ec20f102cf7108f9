import math

import pytest
import torch

from gessl_ext.losses import VICReg


def vicreg_loop(z1, z2, sim_coeff, std_coeff, cov_coeff, eps):
    """Plain-Python VICReg (unbiased variance / covariance)."""
    n, d = z1.shape
    invariance = sum((float(z1[i, j]) - float(z2[i, j])) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def terms(z):
        means = [sum(float(z[i, j]) for i in range(n)) / n for j in range(d)]
        cov = [[sum((float(z[k, i]) - means[i]) * (float(z[k, j]) - means[j]) for k in range(n)) / (n - 1)
                for j in range(d)] for i in range(d)]
        variance = sum(max(0.0, 1 - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d / 2
        covariance = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return variance, covariance

    v1, c1 = terms(z1)
    v2, c2 = terms(z2)
    return sim_coeff * invariance + std_coeff * (v1 + v2) + cov_coeff * (c1 + c2)


def test_variance_term_closed_form():
    # identical views [[a, 0], [-a, 0]]: invariance 0, covariance 0 (second column constant),
    # unbiased variances 2a^2 and 0 -> each view: (relu(1 - sqrt(2a^2 + eps)) + 1 - sqrt(eps)) / 2 / 2.
    a, eps = 0.5, 1e-4
    z = torch.tensor([[a, 0.0], [-a, 0.0]], dtype=torch.float64)
    expected = 25 * 2 * ((1 - math.sqrt(2 * a**2 + eps)) + (1 - math.sqrt(eps))) / 4
    assert VICReg().pair_loss(z, z.clone()).item() == pytest.approx(expected, rel=1e-12)


def test_covariance_term_closed_form():
    # identical views [[1, 1], [-1, -1]]: variances 2 (std > 1, no variance penalty), covariance 2
    # -> each view: (2^2 + 2^2) / d = 4; total 1 * (4 + 4).
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert VICReg().pair_loss(z, z.clone()).item() == pytest.approx(8.0, rel=1e-12)


def test_invariance_term_closed_form():
    # views differ by a constant shift 0.1; columns uncorrelated with unbiased variance 16/3 (no hinge):
    # only the invariance term 0.1^2 remains.
    z1 = torch.tensor([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]], dtype=torch.float64)
    z2 = z1 + 0.1
    assert VICReg().pair_loss(z1, z2).item() == pytest.approx(25 * 0.01, rel=1e-12)


@pytest.mark.parametrize("n, d, coeffs", [(5, 4, (25.0, 25.0, 1.0)), (3, 6, (1.0, 2.0, 3.0)), (8, 2, (0.0, 5.0, 0.5))])
def test_matches_loop_reference(n, d, coeffs):
    generator = torch.Generator().manual_seed(n * 10 + d)
    z1, z2 = (torch.randn(2, n, d, dtype=torch.float64, generator=generator) * 0.8).unbind()
    loss = VICReg(*coeffs, eps=1e-4).pair_loss(z1, z2)
    assert loss.item() == pytest.approx(vicreg_loop(z1, z2, *coeffs, 1e-4), rel=1e-10)


def test_rejects_bad_arguments():
    for name in ("sim_coeff", "std_coeff", "cov_coeff"):
        with pytest.raises(ValueError, match=name):
            VICReg(**{name: -1.0})
    with pytest.raises(ValueError, match="eps"):
        VICReg(eps=-1e-4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        VICReg().pair_loss(torch.zeros(1, 3), torch.zeros(1, 3))
