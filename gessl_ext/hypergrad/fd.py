"""AID-FD (DARTS): Hessian-vector products by central finite differences of the gradient.

H u ≈ (∇ℓ(θ + εu) − ∇ℓ(θ − εu)) / 2ε with ε = r / ‖u‖. Exact as r → 0 only when ∇ℓ is continuous;
on ReLU / max-pool networks the quotient also counts gradient jumps (see docs/hypergradients.md).
"""
from __future__ import annotations

import torch

from .reverse import reverse_through_sgd


def finite_difference_hvp(problem, theta, u, radius):
    """Central-difference estimate of ∇²ℓ(θ) u [P] with ε = radius / ‖u‖."""
    eps = radius / torch.linalg.vector_norm(u).clamp_min(1e-30)
    g_plus = problem.grad(theta + eps * u)
    g_minus = problem.grad(theta - eps * u)
    return (g_plus - g_minus) / (2 * eps)


def fd(problem, trajectory, outer_grad, config):
    """dL/dθ through the K inner steps with finite-difference HVPs (2 gradient passes per step)."""
    return reverse_through_sgd(
        problem, trajectory, outer_grad,
        lambda p, theta, u: finite_difference_hvp(p, theta, u, config.fd_radius), config.inner_lr,
    )
