"""Shared helpers for tests/losses (a uniquely named module so it cannot shadow other test helpers)."""
import contextlib
import math

import torch
from torch import nn
from torch.func import functional_call


def tiny_model(in_dim=4, hidden_dim=6, embed_dim=3, seed=0, batch_norm=True):
    """Linear + BatchNorm1d (non-trivial affine params and running stats; omitted if not batch_norm) + ReLU
    + Linear, float64, train mode."""
    torch.manual_seed(seed)
    norm = nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()
    model = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm, nn.ReLU(), nn.Linear(hidden_dim, embed_dim))
    if batch_norm:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    return model.double()


@contextlib.contextmanager
def running_stats_frozen(module):
    """What GeSSLStep does around its passes: BatchNorm layers in train mode normalise with batch
    statistics but do not update their running buffers (required under vmap)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(norms, saved):
            m.track_running_stats = flag


class ObjectiveWrapper(nn.Module):
    """The core's pattern: one module holding the model and the objective, called via functional_call."""

    def __init__(self, model, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x1, x2):
        return self.objective(self.model, x1, x2)


def trainable_params(module):
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def functional_loss(wrapper):
    """(params, x1, x2) -> scalar task loss, as the core evaluates it."""
    return lambda params, x1, x2: functional_call(wrapper, params, (x1, x2))


def reference_prediction_mlp(predictor, z):
    """Plain float64 evaluation of prediction_mlp (Linear no bias, train-mode BN with biased var, ReLU, Linear)."""
    first, norm, _, last = predictor
    h = z @ first.weight.T
    mean = h.mean(dim=0)
    var = ((h - mean) ** 2).mean(dim=0)
    h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    return torch.clamp(h, min=0) @ last.weight.T + last.bias


def cosine(u, v):
    """cos between two 1-D tensors via Python arithmetic (float64)."""
    u, v = u.detach().tolist(), v.detach().tolist()
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))
