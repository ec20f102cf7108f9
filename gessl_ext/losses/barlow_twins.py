"""Barlow Twins redundancy-reduction loss (Zbontar et al., 2021)."""
import torch

from ._checks import check_embedding_pair, check_nonnegative, check_positive
from .base import PairObjective


def _standardise(z, eps):
    """Per-dimension batch standardisation of z [N, d]; biased variance plus ``eps`` under the square
    root keeps it finite (and differentiable) even when a dimension is constant over the batch."""
    centred = z - z.mean(dim=0)
    return centred / torch.sqrt(centred.pow(2).mean(dim=0) + eps)


class BarlowTwins(PairObjective):
    """loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2, with C [d, d] the cross-correlation
    ``standardise(z1).T @ standardise(z2) / N`` of the batch-standardised embeddings."""

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5):
        super().__init__()
        self.lambd = check_nonnegative("lambd", lambd)
        self.eps = check_positive("eps", eps)

    def pair_loss(self, z1, z2):
        check_embedding_pair(z1, z2, min_batch=2)
        n, d = z1.shape
        c = _standardise(z1, self.eps).T @ _standardise(z2, self.eps) / n
        off_diagonal = ~torch.eye(d, dtype=torch.bool, device=c.device)
        on_diagonal_loss = (1 - c.diagonal()).pow(2).sum()
        off_diagonal_loss = torch.where(off_diagonal, c.pow(2), 0).sum()
        return on_diagonal_loss + self.lambd * off_diagonal_loss

    def extra_repr(self):
        return f"lambd={self.lambd}, eps={self.eps}"
