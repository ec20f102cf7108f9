"""BYOL (Grill et al., 2020): predictor plus a momentum target network."""
import torch
import torch.nn.functional as F

from ._checks import check_embedding_pair
from .momentum import MomentumObjective
from .predictor import prediction_mlp


def _normalised_mse(p, t):
    """Mean over rows of ||p/|p| - t/|t|||^2 = 2 - 2 cos(p, t); p, t [N, d]."""
    return (2 - 2 * F.cosine_similarity(p, t, dim=1)).mean()


class BYOL(MomentumObjective):
    """loss = NMSE(p1, t2) + NMSE(p2, t1) (the paper's symmetrised sum), where p = predictor(embed(x)) and
    t = momentum_network(x) is computed without gradient.

    ``self.predictor`` is trainable; ``self.momentum_network`` (the target network) is created by
    ``bind(model)`` and updated by EMA with ``momentum`` in ``before_step`` (constant momentum; set
    ``objective.momentum`` from a schedule if wanted). Online and target embeddings are each computed
    in one call over the 2N images.
    """

    embeds_views_once = True

    def __init__(self, embed_dim: int, hidden_dim: int = 4096, momentum: float = 0.996):
        super().__init__(momentum)
        self.predictor = prediction_mlp(embed_dim, hidden_dim)

    def forward(self, embed, x1, x2):
        x = torch.cat([x1, x2])
        online = embed(x)
        target = self.momentum_embed(x)
        check_embedding_pair(online, target, min_batch=2)
        p1, p2 = self.predictor(online).chunk(2)
        t1, t2 = target.chunk(2)
        return _normalised_mse(p1, t2) + _normalised_mse(p2, t1)

    def extra_repr(self):
        return f"momentum={self.momentum}"
