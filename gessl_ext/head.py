"""The pair-classification head π and the KL outer loss (Eq. 3).

A task of N pairs is an N-way classification problem: view-1 sample i should pick its partner i among
the N view-2 embeddings, and vice versa. π gives, for each of the 2N samples, a distribution over the N
classes from cosine similarities divided by a temperature τ.

A custom head is any callable ``head(z1, z2) -> log_probs [2N, C]`` (log-probabilities over C classes,
the true class of row i being i mod N); :class:`PairHead` is the default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def pair_logits(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Cosine-similarity logits [2N, N]: rows 0..N-1 are view-1 samples against view 2, rows N..2N-1 the reverse."""
    a, b = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    sim = a @ b.transpose(-1, -2) / temperature
    return torch.cat([sim, sim.transpose(-1, -2)], dim=-2)


class PairHead(nn.Module):
    """π: log-probabilities [2N, N] of the pair classification, p_i = softmax_k(cos(z1_i, z2_k) / τ)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"head temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return torch.log_softmax(pair_logits(z1, z2, self.temperature), dim=-1)


def kl_from_log_probs(target_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """Mean over rows of KL(p_target ‖ p): inputs [R, C] log-probabilities; returns a scalar."""
    return (target_log_probs.exp() * (target_log_probs - log_probs)).sum(-1).mean()


def outer_kl(head, z1: Tensor, z2: Tensor, t1: Tensor, t2: Tensor, use_kernels: bool = False) -> Tensor:
    """L_l = mean over the 2N samples of KL(π(target) ‖ π(current)) for one task.

    z1, z2: current embeddings [N, d]; t1, t2: the self-motivated target's embeddings [N, d] (detached).
    With the default head and ``use_kernels`` on a CUDA device the fused softmax-KL op is used.
    """
    if use_kernels and isinstance(head, PairHead) and z1.is_cuda:
        from . import ops

        return ops.softmax_kl_from_embeddings(z1, z2, t1, t2, head.temperature)
    with torch.no_grad():
        target = head(t1, t2)
    return kl_from_log_probs(target, head(z1, z2))
