"""Implicit (proximal, iMAML-style) hypergradients: u = (I + αH(θᴷ))⁻¹ v.

Both solvers use exact Hessian-vector products and a fixed number of iterations, so they run under vmap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Hypergradient, register_hypergradient, setting

ITERS_HELP = "iterations (exact Hessian-vector products per task)"


@register_hypergradient("neumann")
@dataclass(frozen=True)
class Neumann(Hypergradient):
    """Truncated Neumann series of the proximal matrix A = I + αH: A⁻¹v ≈ Σ_{j=0}^{J} (I − A)ʲ v = Σ (−αH)ʲ v,
    J = ``iters`` (converges when α‖H‖ < 1).

    Args:
        iters: J ≥ 1, the number of terms after the first (one exact HVP each).
    """

    iters: int = setting(5, ITERS_HELP, minimum=1)

    def __call__(self, problem, trajectory, outer_grad):
        theta_k = trajectory[-1]
        term, total = outer_grad, outer_grad
        for _ in range(self.iters):
            term = term - problem.proximal_matvec(theta_k, term)
            total = total + term
        return total


def _safe_ratio(num, den):
    ok = den.abs() > 1e-30
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


@register_hypergradient("cg")
@dataclass(frozen=True)
class CG(Hypergradient):
    """Conjugate gradient on (I + αH) u = v, ``iters`` iterations from u = 0 (needs I + αH positive definite).

    Args:
        iters: ≥ 1 iterations (one exact HVP each); exact after P of them in exact arithmetic.
    """

    iters: int = setting(5, ITERS_HELP, minimum=1)

    def __call__(self, problem, trajectory, outer_grad):
        theta_k = trajectory[-1]
        solution = torch.zeros_like(outer_grad)
        residual = outer_grad
        direction = residual
        rs = residual @ residual
        for _ in range(self.iters):
            applied = problem.proximal_matvec(theta_k, direction)
            step = _safe_ratio(rs, direction @ applied)
            solution = solution + step * direction
            residual = residual - step * applied
            rs_new = residual @ residual
            direction = residual + _safe_ratio(rs_new, rs) * direction
            rs = rs_new
        return solution
