"""AID with exact Hessian-vector products: the ``fd`` recursion without the finite-difference bias."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Hypergradient, register_hypergradient
from .reverse import reverse_through_sgd


@register_hypergradient("hvp")
@dataclass(frozen=True)
class HVP(Hypergradient):
    """dL/dθ through the K inner steps with exact HVPs (forward-over-reverse at each step's base point); exact."""

    uses_adapted_weights = False

    def __call__(self, problem, trajectory, outer_grad):
        return reverse_through_sgd(trajectory, outer_grad, problem.update_vjp)
