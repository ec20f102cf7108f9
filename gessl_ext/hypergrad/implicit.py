"""Implicit (proximal, iMAML-style) hypergradients: u = (I + αH)⁻¹ v at θᴷ.

Both solvers use exact Hessian-vector products and a fixed number of iterations, so they run under vmap.
"""
from __future__ import annotations

import torch


def neumann(problem, trajectory, outer_grad, config):
    """Truncated Neumann series Σ_{j=0}^{J} (−αH)ʲ v with J = ``implicit_iters``."""
    theta_k = trajectory[-1]
    term, total = outer_grad, outer_grad
    for _ in range(config.implicit_iters):
        term = -config.inner_lr * problem.hvp(theta_k, term)
        total = total + term
    return total


def _safe_ratio(num, den):
    ok = den.abs() > 1e-30
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def cg(problem, trajectory, outer_grad, config):
    """Conjugate gradient on (I + αH) u = v, ``implicit_iters`` iterations from u = 0."""
    theta_k = trajectory[-1]
    solution = torch.zeros_like(outer_grad)
    residual = outer_grad
    direction = residual
    rs = residual @ residual
    for _ in range(config.implicit_iters):
        applied = direction + config.inner_lr * problem.hvp(theta_k, direction)
        step = _safe_ratio(rs, direction @ applied)
        solution = solution + step * direction
        residual = residual - step * applied
        rs_new = residual @ residual
        direction = residual + _safe_ratio(rs_new, rs) * direction
        rs = rs_new
    return solution
