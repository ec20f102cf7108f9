"""VICReg: variance-invariance-covariance regularisation (Bardes et al., 2022)."""
import torch
import torch.nn.functional as F

from ._checks import check_embedding_pair, check_nonnegative, check_positive
from .base import PairObjective


class VICReg(PairObjective):
    """loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance, where for z1, z2 [N, d]:

    invariance = mean squared error between z1 and z2 (mean over N*d);
    variance = mean over both views and dimensions of relu(1 - sqrt(var_unbiased + eps)) / 2 each view;
    covariance = sum of squared off-diagonal entries of each view's covariance (divisor N-1), / d, summed over views.
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4):
        super().__init__()
        self.sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
        self.std_coeff = check_nonnegative("std_coeff", std_coeff)
        self.cov_coeff = check_nonnegative("cov_coeff", cov_coeff)
        self.eps = check_positive("eps", eps)

    def _variance_and_covariance(self, z):
        n, d = z.shape
        centred = z - z.mean(dim=0)
        cov = centred.T @ centred / (n - 1)
        std = torch.sqrt(cov.diagonal() + self.eps)
        variance = F.relu(1 - std).mean() / 2
        off_diagonal = ~torch.eye(d, dtype=torch.bool, device=z.device)
        covariance = torch.where(off_diagonal, cov.pow(2), 0).sum() / d
        return variance, covariance

    def pair_loss(self, z1, z2):
        check_embedding_pair(z1, z2, min_batch=2)
        invariance = F.mse_loss(z1, z2)
        variance1, covariance1 = self._variance_and_covariance(z1)
        variance2, covariance2 = self._variance_and_covariance(z2)
        return (
            self.sim_coeff * invariance
            + self.std_coeff * (variance1 + variance2)
            + self.cov_coeff * (covariance1 + covariance2)
        )

    def extra_repr(self):
        return f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, eps={self.eps}"
