"""σ-measurement (Definition 3.2, Appendix B.1): how well a model's pair classification fits unseen tasks.

Implemented: σ = Σ_tasks Σ_samples KL(onehot(true class) ‖ π(f(x))) = Σ −log π_ii, the cross-entropy
of the pair classification (the direction of the paper's worked example). The paper's Eq. 7 writes the
KL the other way round, KL(π(f_θ*) ‖ π(f_φ_l)), between two models' outputs; with a one-hot truth that
direction is infinite or undefined, so the worked example's direction is the one computed here.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .head import PairHead


@contextlib.contextmanager
def evaluation_mode(model: nn.Module):
    """Every submodule in eval mode inside the block; each one's own ``training`` flag restored after it."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@torch.no_grad()
def sigma_measure(model: nn.Module, views: torch.Tensor, head_temperature: float = 0.1, head=None):
    """σ over unseen tasks (Definition 3.2): (σ total, σ per sample = total / (M·2N)), float64 0-dim tensors.

    views: [M, 2, N ≥ 2, *input_shape] on the model's device. The model is measured as a trained model is
    evaluated: in eval mode (BatchNorm normalises with its running statistics, dropout is off), one forward of
    each task's 2N inputs, and left exactly as it was (training flags restored, no buffer changes). π is
    ``head`` (a callable ``head(z1, z2) -> log_probs [2N, N]``) or :class:`PairHead` with τ = ``head_temperature``.
    Raises ValueError for views of another shape, TypeError for views of another dtype or device than the model.
    """
    if not isinstance(views, torch.Tensor) or views.dim() < 4 or views.shape[1] != 2 or views.shape[2] < 2:
        shape = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
        raise ValueError(f"views must have shape [M, 2, N>=2, *input_shape], got {shape}")
    param = next(model.parameters(), None)
    if param is not None and (views.dtype != param.dtype or views.device != param.device):
        raise TypeError(f"views are {views.dtype} on {views.device} but the model's parameters are {param.dtype} on "
                        f"{param.device}: convert the views, e.g. views.to(next(model.parameters()))")
    head = head if head is not None else PairHead(head_temperature)
    num_tasks, _, n = views.shape[:3]
    truth = torch.arange(n, device=views.device).repeat(2)
    total = views.new_zeros((), dtype=torch.float64)
    with evaluation_mode(model):
        for task in views:
            z1, z2 = model(torch.cat([task[0], task[1]])).chunk(2)
            total += -head(z1, z2).gather(1, truth[:, None]).double().sum()
    return total, total / (num_tasks * 2 * n)
