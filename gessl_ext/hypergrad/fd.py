"""AID-FD (DARTS): Hessian-vector products by central finite differences of the gradient.

H u ≈ (∇ℓ(θ + εu) − ∇ℓ(θ − εu)) / 2ε with ε = r / ‖u‖. Exact as r → 0 only when ∇ℓ is continuous;
on ReLU / max-pool networks the quotient also counts gradient jumps (see docs/hypergradients.md).
The perturbation and the update u − αHu are the fused ``gessl_ext.ops`` (one pass over parameter
memory each on CUDA) or, with ``use_kernels=False``, their plain-PyTorch references.
"""
from __future__ import annotations

from .. import ops
from .reverse import reverse_through_sgd


def finite_difference_step(problem, theta, u, config):
    """u − α Ĥu at θ, with Ĥu the central difference of ∇ℓ at θ ± εu, ε = fd_radius / ‖u‖ (0 when u = 0)."""
    if config.use_kernels:
        perturb, update = ops.fd_perturb, ops.fd_update
    else:
        perturb, update = ops.fd_perturb_reference, ops.fd_update_reference
    theta_plus, theta_minus, eps = perturb(theta, u, config.fd_radius)
    return update(u, problem.grad(theta_plus), problem.grad(theta_minus), eps, config.inner_lr)


def fd(problem, trajectory, outer_grad, config):
    """dL/dθ through the K inner steps with finite-difference HVPs (2 gradient passes per step)."""
    return reverse_through_sgd(trajectory, outer_grad, lambda theta, u: finite_difference_step(problem, theta, u, config))
