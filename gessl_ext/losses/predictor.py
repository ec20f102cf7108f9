"""The prediction MLP of SimSiam and BYOL."""
import torch
from torch import nn

from ._checks import check_positive_int


class BatchStandardisation(nn.Module):
    """Train-mode BatchNorm1d without running statistics, written with plain tensor ops:
    ``(x - mean) / sqrt(biased_var + eps) * weight + bias`` over the batch of x [B, features].

    Unlike ``nn.BatchNorm1d`` it always normalises with the batch and composes with every
    ``torch.func`` transform, including ``vmap`` over reverse-over-reverse differentiation, which
    ``nn.BatchNorm1d``'s double backward does not support.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        centred = x - x.mean(dim=0)
        return centred / torch.sqrt(centred.pow(2).mean(dim=0) + self.eps) * self.weight + self.bias

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class PredictionMLP(nn.Sequential):
    """The predictor's layers; a ValueError names an embedding size other than the one it was built for."""

    def forward(self, z):
        if z.shape[-1] != self[0].in_features:
            raise ValueError(f"the model's embeddings have {z.shape[-1]} dimensions but the predictor was built for "
                             f"embed_dim={self[0].in_features}: construct the objective with embed_dim={z.shape[-1]}")
        return super().forward(z)


def prediction_mlp(embed_dim: int, hidden_dim: int) -> nn.Sequential:
    """Linear(d, h, no bias) -> BatchStandardisation(h) -> ReLU -> Linear(h, d); maps [B, d] -> [B, d].

    The normalisation keeps no running statistics (it always uses the batch, also in eval mode), so
    the predictor has no buffers to update and is safe under ``torch.func.vmap``.
    """
    check_positive_int("embed_dim", embed_dim)
    check_positive_int("hidden_dim", hidden_dim)
    return PredictionMLP(
        nn.Linear(embed_dim, hidden_dim, bias=False),
        BatchStandardisation(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, embed_dim),
    )
