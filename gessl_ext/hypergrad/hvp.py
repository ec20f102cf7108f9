"""AID with exact Hessian-vector products: the ``fd`` recursion without the finite-difference bias."""
from __future__ import annotations

from .reverse import reverse_through_sgd


def hvp(problem, trajectory, outer_grad, config):
    """dL/dθ through the K inner steps with exact HVPs (double backward at each step's base point)."""
    return reverse_through_sgd(problem, trajectory, outer_grad, lambda p, theta, u: p.hvp(theta, u), config.inner_lr)
