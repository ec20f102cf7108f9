"""σ-measurement (Definition 3.2, Appendix B.1): how well a model's pair classification fits unseen tasks.

Implemented: σ = Σ_tasks Σ_samples KL(onehot(true class) ‖ π(f(x))) = Σ −log π_ii, the cross-entropy
of the pair classification (the direction of the paper's worked example). The paper's Eq. 7 writes the
KL the other way round, KL(π(f_θ*) ‖ π(f_φ_l)), between two models' outputs; with a one-hot truth that
direction is infinite or undefined, so the worked example's direction is the one computed here.
"""
from __future__ import annotations

import torch
from torch import nn

from .head import PairHead


@torch.no_grad()
def sigma_measure(model: nn.Module, views: torch.Tensor, head_temperature: float = 0.1, head=None):
    """σ over unseen tasks. views [M, 2, N, *input_shape] → (σ total, σ per sample = total / (M·2N))."""
    if not isinstance(views, torch.Tensor) or views.dim() < 4 or views.shape[1] != 2 or views.shape[2] < 2:
        shape = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
        raise ValueError(f"views must have shape [M, 2, N>=2, *input_shape], got {shape}")
    head = head if head is not None else PairHead(head_temperature)
    num_tasks, _, n = views.shape[:3]
    total = views.new_zeros((), dtype=torch.float64)
    for task in views:
        z1, z2 = model(torch.cat([task[0], task[1]])).chunk(2)
        log_probs = head(z1, z2)
        truth = torch.arange(n, device=views.device).repeat(2)
        total += -log_probs.gather(1, truth[:, None]).double().sum()
    return total, total / (num_tasks * 2 * n)
