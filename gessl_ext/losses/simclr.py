"""SimCLR's NT-Xent loss (Chen et al., 2020)."""
import torch
import torch.nn.functional as F

from ._checks import check_embedding_pair, check_positive
from .base import PairObjective


class SimCLR(PairObjective):
    """NT-Xent over the 2N embeddings of a task.

    Each of the 2N L2-normalised embeddings is an anchor; its positive is the other view of the
    same sample and the remaining 2N-2 embeddings are negatives. loss = mean over anchors of
    ``-log softmax_k(cos(z_a, z_k) / temperature)[positive]`` (k over the 2N-1 others).
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)

    def pair_loss(self, z1, z2):
        check_embedding_pair(z1, z2)
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        logits = z @ z.T / self.temperature
        self_pairs = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_pairs, float("-inf"))
        half = z.shape[0] // 2
        positive = (z[:half] * z[half:]).sum(dim=1) / self.temperature
        return (torch.logsumexp(logits, dim=1) - positive.repeat(2)).mean()

    def extra_repr(self):
        return f"temperature={self.temperature}"
