"""SimSiam (Chen & He, 2021): predictor plus stop-gradient, no negatives, no momentum network."""
import torch
import torch.nn.functional as F

from ._checks import check_embedding_pair
from .base import PairObjective
from .predictor import prediction_mlp


class SimSiam(PairObjective):
    """loss = -1/2 mean_i cos(p1_i, sg(z2_i)) - 1/2 mean_i cos(p2_i, sg(z1_i)), with p = predictor(z).

    ``self.predictor`` (see :func:`prediction_mlp`) is trainable and part of the objective; it is
    applied to all 2N embeddings in one call. ``sg`` is ``detach``: under nested differentiation
    (autograd double backward or ``torch.func`` transforms) the targets are constants at every level.
    """

    def __init__(self, embed_dim: int, hidden_dim: int = 512):
        super().__init__()
        self.predictor = prediction_mlp(embed_dim, hidden_dim)

    def pair_loss(self, z1, z2):
        check_embedding_pair(z1, z2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        return -0.5 * (
            F.cosine_similarity(p1, z2.detach(), dim=1).mean() + F.cosine_similarity(p2, z1.detach(), dim=1).mean()
        )
