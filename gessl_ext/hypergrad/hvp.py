"""AID with exact Hessian-vector products: the ``fd`` recursion without the finite-difference bias."""
from __future__ import annotations

from .reverse import reverse_through_sgd


def hvp(problem, trajectory, outer_grad, config):
    """dL/dθ through the K inner steps with exact HVPs (forward-over-reverse at each step's base point)."""
    return reverse_through_sgd(trajectory, outer_grad, lambda theta, u: u - config.inner_lr * problem.hvp(theta, u))
